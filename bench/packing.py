"""Does sequence packing pay in the GRPO update? Forward + backward time of the policy log-probs on one
rollout batch, three ways, same model, same tokens, same process (issue 15, item 3):

    padded   what `compute_model_log_probs` does without sharing: rows left-aligned, columns of padding
             in every row cut, so each row pays up to the longest row
    packed   every row's real tokens in one (1, total) sequence, position ids restarting per row and no
             attention mask, which transformers turns into a block-diagonal causal mask
             (find_packed_sequence_indices): no padding at all
    shared   `compute_model_log_probs(..., share_prompts=True)`: each group's prompt once, completions
             on its repeated KV cache (what the recipe runs on the hf backend)

Workload: bench/grpo_vs_trl.py's tiny Qwen2 (hidden 256, 4 layers, LoRA r16 on every linear layer),
4 prompts x 8 completions, prompts of 33 tokens, completion lengths drawn uniformly from 8..64 (a
batch where some rows stop early; random weights never stop, so this is set, not sampled).

    python bench/packing.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from opensloth.grpo.core import compute_token_log_probs
    from opensloth.grpo.forward import compute_model_log_probs, get_decoder_and_head
    from opensloth.models.tiny import build_tiny_model

    sys.path.insert(0, str(Path(__file__).parent))
    from grpo_vs_trl import HIDDEN, LAYERS, LORA_R, PROMPTS, G

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(build_tiny_model(Path(tmp), hidden_size=HIDDEN,
                                                                      num_layers=LAYERS, seed=0))
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear")).train()
    g = torch.Generator().manual_seed(0)
    P, T, B = 33, 64, PROMPTS * G
    prompts = torch.randint(3, 256, (PROMPTS, P), generator=g).repeat_interleave(G, dim=0)  # (B, P)
    lengths = torch.randint(8, T + 1, (B,), generator=g)  # (B,)
    completions = torch.randint(3, 256, (B, T), generator=g)
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()  # (B, T)
    input_ids = torch.cat([prompts, completions * completion_mask], dim=1)  # (B, P + T)
    attention_mask = torch.cat([torch.ones_like(prompts), completion_mask], dim=1)

    def rows(share: bool):
        logp, _ = compute_model_log_probs(model, input_ids, attention_mask, num_completion_tokens=T,
                                          share_prompts=share)
        return (logp * completion_mask).sum()

    def packed():
        decoder, head = get_decoder_and_head(model)
        real = attention_mask.bool()
        flat = input_ids[real][None]  # (1, total)
        positions = (attention_mask.cumsum(-1) - 1)[real][None]  # restarts at 0 for every row
        hidden = decoder(input_ids=flat, position_ids=positions, use_cache=False).last_hidden_state[0]  # (total, H)
        # Row b's completion token j is predicted by its token P + j - 1.
        starts = torch.cat([torch.zeros(1, dtype=torch.long), attention_mask.sum(-1).cumsum(0)[:-1]])  # (B,)
        index = starts[:, None] + P - 1 + torch.arange(T)[None]  # (B, T)
        index = index.clamp(max=hidden.shape[0] - 1)
        logp, _ = compute_token_log_probs(hidden[index], head, completions, with_entropy=True)
        return (logp * completion_mask).sum()

    ways = {"padded": lambda: rows(False), "packed": packed, "shared": lambda: rows(True)}
    with torch.no_grad():
        values = {name: float(fn()) for name, fn in ways.items()}
    times = {name: [] for name in ways}
    for _ in range(args.repeats):  # interleaved, so load changes hit every way alike
        for name, fn in ways.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn().backward()
            times[name].append(time.perf_counter() - start)
    real_tokens = int(attention_mask.sum())
    print(f"{B} rows, {real_tokens} real tokens; padded width {P + int(lengths.max())} "
          f"({B * (P + int(lengths.max()))} token slots); shared: {PROMPTS * P + B * T} slots")
    print("| way | forward + backward s (median) | all | sum of log-probs |")
    print("|---|---|---|---|")
    for name in ways:
        print(f"| {name} | {statistics.median(times[name]):.3f} | "
              f"{', '.join(f'{t:.3f}' for t in times[name])} | {values[name]:.3f} |")


if __name__ == "__main__":
    main()
