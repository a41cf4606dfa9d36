"""The compute floor of each GRPO phase on this CPU: what the phase would take if it were its matmuls alone.

Both CPU benches (grpo_vs_trl.py, cpu_qwen_workload.py) print these beside their measured phases, so the
table says how far each phase is from what the hardware allows, and which phase a faster step must come from.

- forward FLOPs: 2 x (linear parameters) x tokens, the LM head only at the positions whose logits are
  used (the last prompt position in a prefill; the completion positions in a log-prob forward).
- reference = one no-grad forward; policy = that forward plus its backward through a frozen base, which
  computes activation gradients only (dX = dY W^T: the forward's FLOPs again; the LoRA gradients are
  r/hidden of that and left out), so 2 x forward. Attention scores are left out (a few % at these lengths).
- prefill and the log-prob forwards run at the rate of a large square matmul (`matmul_gflops`).
- decode is different: every step multiplies `rows` tokens by every weight matrix, and a matmul with 8 or
  32 rows runs far below the square rate on a CPU (measured below: about 30-100 GFLOP/s against 190).
  Its floor is therefore measured directly: one decode step's matmuls at M = rows, timed alone
  (`decode_step_matmul_seconds`), times the number of decode steps.

`shared=True` is ours (each prompt prefilled once per group, and run once per group through the log-prob
forwards); `shared=False` is TRL's (once per row).
"""

from __future__ import annotations

import time
from collections import Counter


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This CPU's fp32 matmul rate (GFLOP/s): the best of `repeats` (size x size) @ (size x size)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):  # warm the thread pool and the clock: the first products run ~40% slower
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def linear_shapes(config) -> tuple[Counter, tuple[int, int]]:
    """The (out, in) weight shapes of a Llama/Qwen2-style decoder's linear layers with their counts, and the
    LM head's (vocab, hidden)."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layers = config.num_hidden_layers
    shapes = Counter({(q, h): layers, (h, q): layers, (i, h): 2 * layers, (h, i): layers})
    shapes[(kv, h)] += 2 * layers
    return shapes, (config.vocab_size, h)


def decode_step_matmul_seconds(config, rows: int, repeats: int = 3) -> float:
    """Seconds of one decode step's matmuls alone: `rows` tokens through every linear layer and the LM head,
    fp32, with the torch threads as set; the best of `repeats` passes.

    Every layer gets its own weight matrices, as in the model: a pass streams all of them from memory
    (2 GB at the 0.5B shape), where timing one matrix over and over would time it from the cache.
    """
    import torch

    shapes, head = linear_shapes(config)
    weights = [torch.randn(shape) for shape, count in shapes.items() for _ in range(count)] + [torch.randn(head)]
    inputs = {in_features: torch.randn(rows, in_features) for _, in_features in [*shapes, head]}
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms the allocator and the clock
        start = time.perf_counter()
        for weight in weights:
            torch.nn.functional.linear(inputs[weight.shape[1]], weight)
        best = min(best, time.perf_counter() - start)
    return best


def phase_floors(config, *, prompt_tokens: int, completion_tokens: int, decode_steps: int, rows: int,
                 groups: int, shared: bool, gflops: float, decode_step_s: float) -> dict[str, float]:
    """Seconds each phase needs at its floor (module docstring).

    Args:
        config: the model's config (a transformers PretrainedConfig).
        prompt_tokens: tokens of one prompt; completion_tokens: mean tokens of one completion.
        decode_steps: forwards of the decode loop (the longest completion).
        rows: completions per step (prompts x G); groups: prompts per step.
        shared: prompts once per group (ours) or once per row (TRL).
        gflops: `matmul_gflops()`; decode_step_s: `decode_step_matmul_seconds(config, rows)`.
    """
    shapes, (vocab, hidden) = linear_shapes(config)
    body = sum(out_f * in_f * count for (out_f, in_f), count in shapes.items())
    head = vocab * hidden
    prompt_rows = groups if shared else rows
    prefill = 2 * (body * prompt_tokens + head) * prompt_rows
    completion = completion_tokens * rows
    forward = 2 * (body * (prompt_tokens * prompt_rows + completion) + head * completion)
    return {"prefill": prefill / gflops / 1e9, "decode": decode_step_s * decode_steps,
            "reference": forward / gflops / 1e9, "policy": 2 * forward / gflops / 1e9}


def print_floors(config, *, prompt_tokens: int, completion_tokens: int, decode_steps: int, rows: int,
                 groups: int) -> dict[str, dict[str, float]]:
    """Measure the rates now and print the floors of ours and TRL's work; returns them."""
    gflops = matmul_gflops()
    decode_step_s = decode_step_matmul_seconds(config, rows)
    print(f"\ncompute floor per phase (s): fp32 square matmul {gflops:.0f} GFLOP/s; one decode step's matmuls at "
          f"{rows} rows {1000 * decode_step_s:.2f} ms; {prompt_tokens}-token prompts, completions of "
          f"{completion_tokens:.0f} tokens on average, {decode_steps} decode steps")
    floors = {}
    for name, shared in (("ours (prompt once per group)", True), ("TRL (prompt once per row)", False)):
        floors[name] = phase_floors(config, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                    decode_steps=decode_steps, rows=rows, groups=groups, shared=shared,
                                    gflops=gflops, decode_step_s=decode_step_s)
        total = sum(floors[name].values())
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in floors[name].items()) + f"; sum {total:.3f}")
    return floors
