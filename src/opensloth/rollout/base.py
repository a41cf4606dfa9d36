"""The rollout contract: what every generation engine (hf, vllm) takes and returns.

An engine turns N prompts into B = N x G completions, G per prompt, contiguous (rows
i*G .. i*G+G-1 belong to prompt i), and returns them as a `RolloutBatch` of padded tensors
that the recipe feeds straight into the policy forward: `input_ids` = left-padded prompt
followed by right-padded completion.

Glossary:
    N: prompts.  G: completions per prompt (group size).  B: N x G rows.
    P: prompt length after left padding.  T: completion length after right padding
       (<= max_new_tokens; the longest completion in the batch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

# A prompt is either text already rendered with the chat template (and generation prompt),
# or its token ids (the prepared dataset's `prompt_ids`, which saves re-tokenising).
Prompt = str | Sequence[int]


@dataclass
class RolloutBatch:
    """Completions of a batch of prompts, G per prompt.

    Attributes:
        prompt_ids: (B, P) int64, left-padded with the pad id.
        prompt_mask: (B, P) int64, 1 on real prompt tokens.
        completion_ids: (B, T) int64, right-padded with the pad id after the completion's end: its
            first EOS, or the token that completed a stop string (`stop_strings`), whichever is first.
        completion_mask: (B, T) int64, 1 up to and including that end token, 0 after.
        completions_text: B strings, decoded up to and including the end token without special
            tokens (so a stop string stays in the text, as with transformers' generate).
        is_truncated: (B,) bool, True where neither an EOS nor a stop string came within
            max_new_tokens (a stop string ends a completion as EOS does: not truncated).
        prompt_index: (B,) int64, the prompt each row answers (0 .. N-1, each repeated G times).
        sampler_log_probs: (B, T) float32 log-probs of the sampled tokens as the sampler computed
            them (for truncated importance sampling), or None when the engine does not report
            them (hf: the trainer's own forward is the sampler).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    completions_text: list[str]
    is_truncated: torch.Tensor
    prompt_index: torch.Tensor
    sampler_log_probs: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + T) prompt then completion: the policy forward's input."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + T) 1 on real prompt and completion tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def is_eos_terminated(self) -> torch.Tensor:
        """(B,) bool, True where the completion ended with EOS or a stop string (the complement of
        is_truncated)."""
        return ~self.is_truncated

    @property
    def num_completion_tokens(self) -> int:
        """T, the padded completion length."""
        return self.completion_ids.shape[1]

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def to(self, device: str | torch.device) -> RolloutBatch:
        """A copy with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return RolloutBatch(**moved)


class RolloutEngine(ABC):
    """A generation engine. Implementations: `opensloth.rollout.hf.HFRolloutEngine`, and the
    optional `opensloth.rollout.vllm` engine."""

    name: str = "base"

    @abstractmethod
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
        """Sample `group_size` completions for each prompt with the current policy (LoRA active).

        Args:
            prompts: N prompts, each a rendered chat-template string or its token ids.
            group_size: G completions per prompt (1 for evaluation).
            max_new_tokens: generation budget per completion.
            temperature: sampling temperature (ignored when greedy).
            top_p: nucleus sampling threshold (1.0 = off).
            min_p: min-p threshold relative to the top token (0.0 = off).
            top_k: keep only the k likeliest tokens (0 = off).
            repetition_penalty: divide positive logits (multiply negative ones) of every token already in
                the prompt or the completion so far by this (1.0 = off); applied before temperature and
                the filters, and also when greedy, as transformers does.
            stop_strings: strings that end a completion at the token that completes one (kept in the
                completion); the prompt never completes one.
            seed: makes the sampling reproducible; None uses the global random state.
            greedy: argmax decoding (evaluation).

        Returns:
            A `RolloutBatch` with B = N x G rows, groups contiguous.
        """

    def sync_weights(self) -> None:
        """Make the engine generate with the policy's current weights (no-op when it shares them)."""

    def close(self) -> None:
        """Release what the engine holds beyond the policy (no-op when it holds nothing)."""


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_ids: Sequence[int],
                             stop_ends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including each row's end (its first EOS, or an earlier stop-string end); flag rows
    without one.

    Args:
        completion_ids: (B, T) generated tokens.
        eos_ids: token ids that end a completion.
        stop_ends: (B,) int64, the position of the token that completed a stop string, T where none did;
            None: no stop strings.

    Returns:
        completion_mask: (B, T) int64, 1 at positions <= the end (everywhere if none).
        is_truncated: (B,) bool, True where the row has no EOS and no stop string.
    """
    T = completion_ids.shape[1]
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_ids), device=completion_ids.device))  # (B, T)
    has_eos = is_eos.any(dim=1)  # (B,)
    # argmax of a bool row is its first True; rows without EOS keep every token.
    end = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, T, dtype=torch.long))
    if stop_ends is not None:
        end = torch.minimum(end, stop_ends.to(end.device))
    positions = torch.arange(T, device=completion_ids.device).unsqueeze(0)  # (1, T)
    completion_mask = (positions <= end.unsqueeze(1)).long()
    return completion_mask, end >= T
