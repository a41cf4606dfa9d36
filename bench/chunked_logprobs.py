"""Chunked vs unchunked per-token log-probs: peak memory and time, forward + backward.

The GRPO loss needs log pi(token) and the entropy at every completion position. The plain way
holds (tokens x V) float32 logits, their log-softmax and, in backward, their gradients; the
chunked way (`opensloth.grpo.core.compute_token_log_probs`) holds one (chunk x V) slice at a time,
recomputing it in backward. Each variant runs in a fresh process so its peak RSS is its own.

    python bench/chunked_logprobs.py                       # Qwen2.5-0.5B head: H 896, V 151,936
    python bench/chunked_logprobs.py --tokens 512 --vocab 32000
    python bench/chunked_logprobs.py --model   # whole tiny Qwen2 (2 layers) with that vocabulary:
                                               # model(...).logits vs opensloth.grpo.compute_model_log_probs
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _run_model(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, queue) -> None:
    """A random 2-layer Qwen2 with a LoRA adapter; 8 sequences of 32 prompt + tokens/8 completion tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opensloth.grpo.forward import compute_model_log_probs

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 448),
                         tie_word_embeddings=True)
    model = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    T = tokens // 8
    input_ids = torch.randint(0, vocab, (8, 32 + T))
    mask = torch.ones_like(input_ids)
    base = _rss_bytes()
    start = time.perf_counter()
    if variant == "unchunked":
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, -T - 1 : -1].float()  # (8, T, V)
        log_softmax = torch.log_softmax(logits, dim=-1)
        logp = log_softmax.gather(-1, input_ids[:, -T:].unsqueeze(-1)).squeeze(-1)
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    else:
        logp, entropy = compute_model_log_probs(model, input_ids, mask, num_completion_tokens=T, chunk_size=chunk)
    (logp.sum() + 0.01 * entropy.sum()).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((seconds, peak - base))


def _run(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, queue) -> None:
    import torch

    from opensloth.grpo.core import compute_token_log_probs

    torch.manual_seed(0)
    h = torch.randn(1, tokens, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden) / hidden**0.5  # frozen lm_head, as with LoRA
    targets = torch.randint(0, vocab, (1, tokens))
    base = _rss_bytes()
    start = time.perf_counter()
    if variant == "unchunked":
        logits = (h @ w.T).float()  # (1, N, V)
        log_softmax = torch.log_softmax(logits, dim=-1)
        logp = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    else:
        logp, entropy = compute_token_log_probs(h, w, targets, chunk_size=chunk, with_entropy=True)
    (logp.sum() + 0.01 * entropy.sum()).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((seconds, peak - base))


def measure(variant: str, args) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_model if args.model else _run, args=(variant, args.tokens, args.hidden, args.vocab, args.chunk, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="completion tokens in the micro-batch (B x T)")
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=1024 // 4)
    parser.add_argument("--model", action="store_true", help="measure a whole (LoRA) model forward + backward")
    args = parser.parse_args()
    full_logits = args.tokens * args.vocab * 4
    print(f"{'whole model' if args.model else 'lm head only'}: tokens {args.tokens}, H {args.hidden}, V {args.vocab}, chunk {args.chunk}; "
          f"one float32 (tokens x V) tensor = {full_logits / 2**20:.0f} MiB")
    results = {v: measure(v, args) for v in ("unchunked", "chunked")}
    for variant, (seconds, peak) in results.items():
        print(f"{variant:>10}: {seconds:6.2f} s  peak +{peak / 2**20:7.0f} MiB")
    (t_u, m_u), (t_c, m_c) = results["unchunked"], results["chunked"]
    print(f"chunked / unchunked: time {t_c / t_u:.2f}x, peak memory {m_c / max(m_u, 1):.2f}x")


if __name__ == "__main__":
    main()
