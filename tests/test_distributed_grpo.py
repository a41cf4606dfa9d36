"""GRPO update on fixed rollouts: 2 gloo workers with half the batch each == 1 worker with all of it.

The real recipe's `GRPORecipe.update` runs (micro-batches, global token counts, the flat gradient
all-reduce, clipping, optimizer step) on a real tiny LoRA model. The optimizer is plain SGD so
the parameter change is proportional to the gradient: Adam's first step (~ sign of the gradient)
would hide a wrong gradient scale. Two epochs over the batch make the second update off-policy
(old log-probs and clipping in play) and the KL term is on.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from opensloth.launch.procs import free_port

PROMPTS, GROUP, PROMPT_LEN, COMPLETION_LEN = 4, 2, 5, 6
SEQUENCES = PROMPTS * GROUP


def fixed_rollouts(vocab_size: int):
    """A rollout batch of 8 sequences: left-padded prompts, completions of varied length."""
    from opensloth.recipes.grpo import Batch

    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, vocab_size, (SEQUENCES, PROMPT_LEN + COMPLETION_LEN), generator=g)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros(SEQUENCES, COMPLETION_LEN, dtype=torch.long)
    for i in range(SEQUENCES):
        pad = i % 3  # left padding of the prompt
        attention_mask[i, :pad] = 0
        length = 1 + (i * 5) % COMPLETION_LEN  # completion tokens up to EOS
        completion_mask[i, :length] = 1
        attention_mask[i, PROMPT_LEN + length:] = 0
    rewards = torch.rand(SEQUENCES, generator=g)
    advantages = (rewards.view(PROMPTS, GROUP) - rewards.view(PROMPTS, GROUP).mean(1, keepdim=True)).view(-1)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
                 advantages=advantages)


def run_update(rank: int, world_size: int, port: int, model_dir: str, loss_agg: str, out_dir: str) -> None:
    from opensloth.config import resolve_config
    from opensloth.distributed import WorkerContext, cleanup, init_distributed
    from opensloth.models import load_model_and_tokenizer
    from opensloth.recipes.grpo import GRPORecipe

    if world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        ctx = init_distributed(use_cuda=False, collective_timeout=60)
    else:
        ctx = WorkerContext(0, 1, 0, torch.device("cpu"))
    # Same global batch: 1 worker x 2 per micro-batch x 4 accumulation == 2 workers x 2 x 2.
    cfg = resolve_config("grpo", None, {
        "model": model_dir, "devices": "cpu", "rollout_batch_size": PROMPTS, "group_size": GROUP,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4 // world_size,
        "epochs_per_rollout_batch": 2, "beta": 0.1, "loss_agg": loss_agg, "max_grad_norm": 0.0,
        "max_new_tokens": COMPLETION_LEN, "lora_r": 4, "lora_alpha": 8,
    })
    torch.manual_seed(0)
    recipe = GRPORecipe(cfg, ctx)
    recipe.model, recipe.tokenizer = load_model_and_tokenizer(cfg.model, cfg.lora, ctx.device)
    # A non-zero LoRA B so that every LoRA matrix gets a gradient from the first update.
    with torch.no_grad():
        for name, p in recipe.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    recipe.params = [p for p in recipe.model.parameters() if p.requires_grad]
    recipe.ref_model = None
    recipe.optimizer = torch.optim.SGD(recipe.params, lr=0.5)
    recipe.scheduler = torch.optim.lr_scheduler.LambdaLR(recipe.optimizer, lambda s: 1.0)
    recipe.model.train()
    initial = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}

    batch = fixed_rollouts(recipe.model.config.vocab_size)
    share = SEQUENCES // world_size
    metrics = recipe.update(batch.select(slice(rank * share, (rank + 1) * share)))
    weights = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    torch.save({"initial": initial, "weights": weights, "metrics": metrics}, Path(out_dir) / f"w{world_size}_r{rank}_{loss_agg}.pt")
    cleanup()


def _two_workers(port: int, model_dir: str, loss_agg: str, out_dir: str) -> None:
    mp.spawn(run_update, args=(2, port, model_dir, loss_agg, out_dir), nprocs=2, join=True)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_two_workers_make_the_same_grpo_update_as_one(tiny_model_dir, tmp_path, loss_agg):
    run_update(0, 1, 0, str(tiny_model_dir), loss_agg, str(tmp_path))
    _two_workers(free_port(), str(tiny_model_dir), loss_agg, str(tmp_path))
    one = torch.load(tmp_path / f"w1_r0_{loss_agg}.pt")
    ranks = [torch.load(tmp_path / f"w2_r{r}_{loss_agg}.pt") for r in range(2)]

    changed = [n for n, w in one["weights"].items() if not torch.equal(w, one["initial"][n])]
    assert len(changed) == len(one["weights"]), "every LoRA matrix must move, or the comparison proves little"
    for two in ranks:
        assert set(two["weights"]) == set(one["weights"])
        for name, weight in one["weights"].items():
            torch.testing.assert_close(two["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    # Logged metrics: the mean over workers (what reduce_metrics does) equals the one-worker value.
    for key in ("loss", "kl"):
        assert _reduced(ranks, key) == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-7)


def _reduced(ranks: list[dict], key: str) -> float:
    """What `reduce_metrics` (mean over workers) makes of the workers' values."""
    return sum(r["metrics"][key] for r in ranks) / len(ranks)
