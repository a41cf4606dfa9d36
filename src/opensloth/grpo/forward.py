"""Completion log-probs from a causal LM without materialising its full (tokens x V) logits.

A HF causal LM is a decoder (embeddings, blocks, final norm) plus an `lm_head`; its forward
computes logits for every position at once, (B, P + T, V) in float32 after upcasting, which
for a 150k vocabulary dominates the step's memory. Here we run only the decoder
(`model.get_decoder()`), keep the hidden states of the positions that predict completion
tokens, and hand them with the lm_head weight to `compute_token_log_probs`, which works in
chunks. This reaches through a PEFT wrapper (PeftModel forwards `get_decoder` to the base
model, whose injected LoRA layers stay active), so it also serves the reference policy under
`with model.disable_adapter():`.

The decoder sees every row left-aligned (its prompt's left padding moved to the end), never
left-padded. With left padding, the padded positions are query rows whose keys are all masked;
on an H100 in bf16 the backward of such rows made every LoRA gradient NaN (Qwen2.5-0.5B shape,
prompts padded to the hf engine's multiple of 64), while the same batch without padding trained.
Left-aligned, a padded position sees the row's real tokens, and a real token sees exactly what it
saw before, at the same position ids, so the log-probs are unchanged. Columns that are padding
in every row are then cut off before the forward.

Shared prompts (`share_prompts=True`). The G completions of a group share one prompt, so the
decoder can run each distinct prompt once, repeat its KV cache (an indexing op, so gradients flow
back to the prompt's one forward) and run only the completions on top of it: the prompt tokens cost
one forward and one backward per group instead of G. The log-probs are the same function of the
weights (the same keys, values and position ids reach every completion token); only the batch
shapes, hence float rounding, differ. It needs a decoder that accepts `past_key_values` in training,
so it is skipped when gradient checkpointing is on (transformers then drops the cache) and the
recipe asks for it only with the hf backend.

Duck-typed on the model: this module imports no transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from opensloth.grpo.core import compute_token_log_probs


def get_decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    """The decoder (everything up to the final norm) and the lm_head weight (V, H) of a causal LM.

    Raises:
        ValueError: the model has no separable decoder, or its logits are not lm_head(hidden)
            alone (a bias, soft-capping or a logit scale would be silently skipped).
    """
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no get_decoder()/get_output_embeddings(); "
                         "chunked log-probs need a standard causal LM")
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"model config sets {attr}; chunked log-probs assume logits = lm_head(hidden)")
    if getattr(head, "bias", None) is not None:
        raise ValueError("the lm_head has a bias; chunked log-probs assume logits = hidden @ W^T")
    return decoder, head.weight


def compute_model_log_probs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_completion_tokens: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    share_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the last `num_completion_tokens` tokens of each sequence.

    Position ids follow the attention mask (0 at each row's first real token), exactly as
    `generate` numbered them for left-padded prompts.

    Args:
        model: a causal LM (HF, PEFT-wrapped or Unsloth-patched).
        input_ids: (B, P + T) left-padded prompt ids followed by right-padded completion ids.
        attention_mask: (B, P + T) 1 on real tokens (prompt and completion), 0 on padding.
        num_completion_tokens: T.
        temperature: the sampling temperature (logits are divided by it).
        chunk_size: tokens per chunk of the (tokens x V) computation.
        with_entropy: also return per-token entropies.
        share_prompts: run each distinct prompt through the decoder once (see the module docstring).

    Returns:
        logp (B, T) float32 and entropy (B, T) float32 or None. Values at padded completion
        positions are meaningless: mask them.
    """
    decoder, head_weight = get_decoder_and_head(model)
    T = num_completion_tokens
    hidden = None
    if share_prompts and not _checkpointing(decoder):
        hidden = _shared_prompt_hidden(decoder, input_ids, attention_mask, T)
    if hidden is None:
        hidden = _row_hidden(decoder, input_ids, attention_mask, T)
    targets = input_ids[:, -T:]  # (B, T)
    return compute_token_log_probs(
        hidden, head_weight, targets, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy
    )


def _checkpointing(decoder: torch.nn.Module) -> bool:
    """True when some layer recomputes activations in this mode (transformers then ignores a KV cache)."""
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in decoder.modules())


def _row_hidden(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Hidden states (B, T, H) that predict the last T tokens, each row through the decoder whole."""
    L = input_ids.shape[1]
    ids, mask, shift = left_align(input_ids, attention_mask)  # (B, L), (B, L), (B,)
    width = max(int(mask.sum(dim=1).max()), 1)  # columns past every row's last real token are padding
    ids, mask = ids[:, :width], mask[:, :width]  # (B, W)
    position_ids = (mask.long().cumsum(dim=-1) - 1).clamp_min(0)  # (B, W): 0 at each row's first real token
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, W, H)
    # Position t predicts token t + 1: the T completion tokens are predicted from the original
    # positions L-T-1 .. L-2, which sit `shift` columns earlier in the aligned rows. Positions that
    # fell in the cut-off padding are clamped to the last column: they predict padding and are masked.
    predicting = torch.arange(L - T - 1, L - 1, device=ids.device)  # (T,)
    columns = (predicting[None, :] - shift[:, None]).clamp(0, width - 1)  # (B, T)
    return hidden.gather(1, columns[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, T, H)


def _shared_prompt_hidden(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          T: int) -> torch.Tensor | None:
    """Like `_row_hidden`, but each distinct prompt goes through the decoder once (module docstring).

    The prompt is the first L - T columns (left-padded), the completion the last T (right-padded).

    Returns:
        (B, T, H) hidden states, or None when no two rows share a prompt (nothing to save).
    """
    B, L = input_ids.shape
    P = L - T
    if P < 1:
        return None
    # Distinct prompts (U of them) and, for each row, which one it has.
    prompts, row_prompt = torch.unique(torch.cat([input_ids[:, :P], attention_mask[:, :P].long()], dim=1),
                                       dim=0, return_inverse=True)  # (U, 2P), (B,)
    if prompts.shape[0] == B:
        return None
    ids, mask, _ = left_align(prompts[:, :P], prompts[:, P:])  # (U, P): real tokens first
    lengths = mask.sum(dim=1)  # (U,)
    width = max(int(lengths.max()), 1)
    ids, mask = ids[:, :width], mask[:, :width]  # (U, W)
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=-1) - 1).clamp_min(0),
                  use_cache=True)
    prompt_hidden = out.last_hidden_state  # (U, W, H)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None  # a decoder that returned no standard KV cache: the whole-row forward instead
    cache.batch_select_indices(row_prompt)  # (U, ...) -> (B, ...): differentiable indexing
    # The completions on top of their prompt's cache; position ids continue each prompt's.
    row_lengths = lengths[row_prompt]  # (B,)
    full_mask = torch.cat([mask[row_prompt], attention_mask[:, P:]], dim=1)  # (B, W + T)
    positions = row_lengths[:, None] + torch.arange(T, device=ids.device)[None, :]  # (B, T)
    out = decoder(input_ids=input_ids[:, P:], attention_mask=full_mask, position_ids=positions,
                  past_key_values=cache, use_cache=True)
    completion_hidden = out.last_hidden_state  # (B, T, H)
    # Completion token 0 is predicted by the prompt's last real token, token j by completion token j - 1.
    last = prompt_hidden[row_prompt, row_lengths.clamp_min(1) - 1]  # (B, H)
    return torch.cat([last[:, None], completion_hidden[:, :-1]], dim=1)  # (B, T, H)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each row's leading padding to its end, keeping the order of everything else.

    Args:
        input_ids: (B, L) token ids, rows left-padded (and possibly right-padded).
        attention_mask: (B, L) 1 on real tokens, 0 on padding.

    Returns:
        ids (B, L) and mask (B, L), row b rotated left by shift[b] columns, and shift (B,) int64:
        the number of leading padding columns of each row (L for a row with no real token,
        which is then left as it is).
    """
    L = input_ids.shape[1]
    shift = (attention_mask.long().cumsum(dim=-1) == 0).sum(dim=-1)  # (B,) leading zeros of the mask
    source = (torch.arange(L, device=input_ids.device)[None, :] + shift[:, None]) % L  # (B, L)
    return input_ids.gather(1, source), attention_mask.gather(1, source), shift
