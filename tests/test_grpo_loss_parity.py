"""TRL parity of the loss-side GRPO options: on fixed batches, our recipe's loss and LoRA gradients equal
TRL 1.16's GRPOTrainer `compute_loss` (run in the TRL venv, the `trl_python` fixture, by tests/fixtures/trl_loss_parity.py).

The batches: a tiny Qwen2 (opensloth.models.tiny) with a LoRA adapter whose A and B are both random
(so every LoRA gradient is non-zero), 4 prompts of 4 tokens (no padding: TRL numbers positions from 0
including left padding, we from the first real token), completions of 6 tokens, equal or unequal
lengths, some ending in EOS and some cut at the limit; fixed advantages, and old and reference
log-probs that differ from the policy's (so ratios clip and the KL is non-zero).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from opensloth.config import GRPORunConfig
from opensloth.distributed import WorkerContext
from opensloth.grpo.core import compute_group_advantages, compute_vllm_is_weights, mask_truncated_completions
from opensloth.recipes.grpo import Batch, GRPORecipe

PARITY_SCRIPT = Path(__file__).parent / "fixtures" / "trl_loss_parity.py"
EOS, PAD, T = 258, 256, 6
LOSS_TOL, GRAD_TOL = 1e-6, 1e-5

# name -> (batch, our options, micro-batch layout: TRL's micro-batches (rows), per_device bs, GA, TRL's
# steps_per_generation). Each case's first optimizer step is compared.
BASE = {"epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.04}
ONE = ([[0, 1, 2, 3]], 4, 1, 1)  # one micro-batch, one optimizer step per generation batch
TWO = ([[0, 1], [2, 3]], 2, 2, 2)  # two accumulated micro-batches
FIRST_OF_TWO = ([[0], [1]], 1, 2, 4)  # two optimizer steps per generation batch; the first one
CASES = {
    **{f"{loss}_{batch}": (batch, {"loss_type": loss}, ONE)
       for loss in ("grpo", "bnpo", "dr_grpo", "dapo") for batch in ("equal", "unequal")},
    **{f"{loss}_accumulated": ("unequal", {"loss_type": loss}, TWO) for loss in ("grpo", "bnpo", "dr_grpo", "dapo")},
    "dapo_two_updates": ("unequal", {"loss_type": "dapo"}, FIRST_OF_TWO),
    "bnpo_two_updates": ("unequal", {"loss_type": "bnpo"}, FIRST_OF_TWO),
    "grpo_sequence": ("unequal", {"loss_type": "grpo", "importance_sampling_level": "sequence"}, ONE),
    "dapo_sequence": ("unequal", {"loss_type": "dapo", "importance_sampling_level": "sequence"}, TWO),
    "grpo_delta": ("unequal", {"loss_type": "grpo", "delta": 1.05}, ONE),
    "dapo_sequence_delta": ("equal", {"loss_type": "dapo", "importance_sampling_level": "sequence", "delta": 1.1}, ONE),
    "dapo_top_entropy": ("unequal", {"loss_type": "dapo", "top_entropy_quantile": 0.5}, ONE),
    "bnpo_top_entropy_accumulated": ("unequal", {"loss_type": "bnpo", "top_entropy_quantile": 0.3}, TWO),
    "grpo_mask_truncated": ("unequal", {"loss_type": "grpo", "mask_truncated_completions": True}, ONE),
    "dapo_mask_truncated": ("unequal", {"loss_type": "dapo", "mask_truncated_completions": True}, TWO),
    "bnpo_mask_truncated": ("equal", {"loss_type": "bnpo", "mask_truncated_completions": True}, ONE),
    "grpo_bias_correction_kl": ("unequal", {"loss_type": "grpo", "use_bias_correction_kl": True}, ONE),
    "dapo_sequence_bias_correction_kl": ("unequal", {"loss_type": "dapo", "importance_sampling_level": "sequence",
                                                     "delta": 1.1, "use_bias_correction_kl": True}, TWO),
    **{f"dapo_vllm_{mode}": ("unequal", {"loss_type": "dapo", "vllm_importance_sampling_mode": mode,
                                         "vllm_importance_sampling_clip_min": 0.8,
                                         "vllm_importance_sampling_cap": 1.25}, TWO)
       for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")},
}


def make_batch(lengths: list[int], eos_rows: list[int], seed: int) -> dict:
    """4 sequences: prompts of 4 tokens, completions of `lengths` tokens, EOS last on `eos_rows`."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, 250, (4, 4), generator=gen)
    completion_ids = torch.full((4, T), PAD)
    completion_mask = torch.zeros(4, T, dtype=torch.long)
    for row, length in enumerate(lengths):
        completion_ids[row, :length] = torch.randint(0, 250, (length,), generator=gen)
        if row in eos_rows:
            completion_ids[row, length - 1] = EOS
        completion_mask[row, :length] = 1
    rewards = torch.tensor([1.0, 0.0, 0.25, 0.75])
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones(4, 4, dtype=torch.long),
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": torch.tensor([0.9, -0.7, 0.4, -1.1]), "rewards": rewards, "group_size": 2,
            "is_eos_terminated": torch.tensor([row in eos_rows for row in range(4)])}


def load_policy(model_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True).train()


def make_recipe(model, batch_options: dict, bs: int, ga: int) -> GRPORecipe:
    options = {**BASE, **batch_options}
    cfg = GRPORunConfig(model={"model": "tiny"}, grpo={**options, "rollout_batch_size": 2, "group_size": 2,
                                                       "max_new_tokens": T},
                        training={"per_device_train_batch_size": bs, "gradient_accumulation_steps": ga})
    recipe = GRPORecipe(cfg, WorkerContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    recipe.model, recipe.share_prompts = model, False
    return recipe


@pytest.fixture(scope="module")
def parity(tiny_model_dir, trl_python, tmp_path_factory):
    """Ours and TRL's loss and gradients for every case, computed once."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("loss_parity")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"],
                      init_lora_weights=False)  # B random too: every LoRA gradient is non-zero
    get_peft_model(base, lora).save_pretrained(tmp / "adapter")
    model = load_policy(tiny_model_dir, tmp / "adapter")

    batches = {"equal": make_batch([T, T, T, T], eos_rows=[0, 2], seed=1),
               "unequal": make_batch([T, 3, 5, 2], eos_rows=[1, 2, 3], seed=2)}
    gen = torch.Generator().manual_seed(3)
    for batch in batches.values():
        recipe = make_recipe(model, {"loss_type": "grpo"}, 4, 1)
        with torch.no_grad():
            logp = recipe.log_probs(to_batch(batch, batch["completion_mask"]), model, with_entropy=False)[0]
        batch["old_log_probs"] = logp + 0.3 * torch.randn(logp.shape, generator=gen)
        batch["ref_log_probs"] = logp + 0.2 * torch.randn(logp.shape, generator=gen)
        batch["sampler_log_probs"] = batch["old_log_probs"] + 0.15 * torch.randn(logp.shape, generator=gen)

    ours, cases, weights = {}, {}, {}
    for name, (key, options, (micro_batches, bs, ga, steps_per_generation)) in CASES.items():
        batch = batches[key]
        recipe = make_recipe(model, options, bs, ga)
        g = recipe.cfg.grpo
        mask = batch["completion_mask"]
        if g.mask_truncated_completions:
            mask = mask_truncated_completions(mask, batch["is_eos_terminated"])
        full = to_batch(batch, mask, with_sampler="vllm_importance_sampling_mode" in options)
        rows = sorted(r for micro in micro_batches for r in micro)
        updates_per_pass = steps_per_generation // ga  # TRL's optimizer steps per generation batch
        model.zero_grad(set_to_none=True)
        loss, _, _ = recipe.accumulate_gradients(full.select(torch.tensor(rows)),
                                                 rollout_tokens_per_update=float(mask.sum()) / updates_per_pass)
        ours[name] = {"loss": loss, "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                              if p.requires_grad}}
        if "vllm_importance_sampling_mode" in options:
            weights[name] = compute_vllm_is_weights(batch["old_log_probs"], batch["sampler_log_probs"], mask,
                                                    g.vllm_importance_sampling_mode, g.vllm_importance_sampling_cap,
                                                    g.vllm_importance_sampling_clip_min)
        cases[name] = {"batch": key, "loss_type": g.loss_type, "epsilon": g.epsilon, "epsilon_high": g.epsilon_high,
                       "beta": g.beta, "importance_sampling_level": g.importance_sampling_level, "delta": g.delta,
                       "top_entropy_quantile": g.top_entropy_quantile,
                       "use_bias_correction_kl": g.use_bias_correction_kl,
                       "mask_truncated_completions": g.mask_truncated_completions, "micro_batches": micro_batches,
                       "gradient_accumulation_steps": ga, "steps_per_generation": steps_per_generation}

    torch.save({k: {f: v for f, v in b.items() if f != "is_eos_terminated"} for k, b in batches.items()},
               tmp / "batches.pt")
    (tmp / "cases.json").write_text(json.dumps(cases))
    torch.save(weights, str(tmp / "cases.json") + ".weights.pt")
    proc = subprocess.run([str(trl_python), str(PARITY_SCRIPT), str(tiny_model_dir), str(tmp / "adapter"),
                           str(tmp / "batches.pt"), str(tmp / "cases.json"), str(tmp / "trl.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp,
                          env={**os.environ, "PYTHONPATH": "", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ours, torch.load(tmp / "trl.pt"), batches


def to_batch(batch: dict, mask: torch.Tensor, with_sampler: bool = False) -> Batch:
    """Our Batch of the fixed sequences (completion mask `mask`)."""
    return Batch(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
                 attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
                 completion_mask=mask, advantages=batch["advantages"], old_log_probs=batch.get("old_log_probs"),
                 ref_log_probs=batch.get("ref_log_probs"),
                 sampler_log_probs=batch.get("sampler_log_probs") if with_sampler else None)


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_lora_gradients_equal_trl(parity, name):
    ours, trl, _ = parity
    mine, theirs = ours[name], trl["cases"][name]
    assert abs(mine["loss"] - theirs["loss"]) < LOSS_TOL, (mine["loss"], theirs["loss"])
    assert mine["grads"].keys() == theirs["grads"].keys()
    worst = max(float((mine["grads"][k] - theirs["grads"][k]).abs().max()) for k in mine["grads"])
    assert worst < GRAD_TOL, worst
    assert all(float(g.abs().max()) > 1e-4 for g in mine["grads"].values())  # every LoRA matrix moves


def test_truncation_and_advantages_equal_trl(parity):
    """mask_truncated_completions' rows (ours: no EOS) and scale_rewards' advantages (ours: the batch std
    from GRPORecipe.global_reward_std) are TRL's."""
    _, trl, batches = parity
    for key, batch in batches.items():
        assert torch.equal(~batch["is_eos_terminated"], trl["truncated"][key])
        recipe = make_recipe(None, {"loss_type": "grpo"}, 4, 1)
        for scale in ("group", "batch", "none"):
            ours = compute_group_advantages(batch["rewards"], 2, normalize_by_std=scale != "none",
                                            scale_std=recipe.global_reward_std(batch["rewards"])
                                            if scale == "batch" else None)[0]
            torch.testing.assert_close(ours, trl["advantages"][(key, scale)], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_one_update_reuses_its_forward_as_pi_old_against_a_sampler(tiny_model_dir, tmp_path, mode):
    """With a sampler's log-probs (vLLM, a rollout worker) and one update per batch, pi_old is the update's
    own forward (no second pass): the loss, the gradients and the mismatch metric equal those computed
    from a separate no-grad forward, as TRL computes old_per_token_logps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from opensloth.grpo.core import compute_sampler_logprob_diff

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    model = load_policy(tiny_model_dir, tmp_path / "adapter")
    raw = make_batch([T, 3, 5, 2], eos_rows=[1, 2, 3], seed=2)
    recipe = make_recipe(model, {"loss_type": "grpo", "vllm_importance_sampling_mode": mode}, 2, 2)
    batch = to_batch(raw, raw["completion_mask"])
    with torch.no_grad():
        separate = recipe.log_probs(batch, model, with_entropy=False)[0]
    batch.sampler_log_probs = separate + 0.2 * torch.randn(separate.shape, generator=torch.Generator().manual_seed(4))

    results = []
    for old in (None, separate):
        batch.old_log_probs = old
        recipe.sampler_diffs = []
        model.zero_grad(set_to_none=True)
        loss, _, _ = recipe.accumulate_gradients(batch)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads, recipe.sampler_mismatch(batch)))
    (loss_reused, grads_reused, mismatch_reused), (loss_separate, grads_separate, mismatch_separate) = results
    assert abs(loss_reused - loss_separate) < 1e-6 and loss_reused != 0
    for name, grad in grads_separate.items():
        torch.testing.assert_close(grads_reused[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert mismatch_reused == pytest.approx(mismatch_separate, abs=1e-6)
    expected = compute_sampler_logprob_diff(separate, batch.sampler_log_probs, batch.completion_mask)
    assert mismatch_reused["rollout/logprob_diff_max"] == pytest.approx(float(expected.max()), abs=1e-6)
