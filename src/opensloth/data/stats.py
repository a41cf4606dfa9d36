"""What data prep read, kept and dropped: `PrepStats`, and `describe_drops` for the plan and the log.

A prepared dataset's metadata JSON (`opensloth_prepared.json`, key "stats") holds these numbers as one
flat object whose keys are the names below (`PrepStats.to_dict`); `os-train data` prints each of them.
`PrepStats.from_dict` reads that object back, also from a directory written by an older version: a
field it lacks keeps its default, and a key it does not know is kept as it is (`other`), so nothing
written before is lost or refused.

Which keys a recipe writes:
  both: rows_in, format, num_rows, bad_rows (+ bad_row_examples when some), num_samples_requested
        (when --num-samples exceeded the rows), and, when prepared for training, eval_rows,
        chat_template, seconds;
  SFT (`SFTTokenStats`): max_seq_length, truncated_rows, dropped_no_assistant_tokens, tokens,
        assistant_tokens, longest_row_tokens;
  GRPO (`PromptLengthStats`, and prompt_rendering): the prompt-length percentiles, the filter and what
        it dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from opensloth.errors import plural


@dataclass
class SFTTokenStats:
    """Token counts of the SFT training rows (after truncation; held-out rows are not counted)."""

    max_seq_length: int | None = None
    truncated_rows: int = 0  # rows longer than --max-seq-length, cut to it
    dropped_no_assistant_tokens: int = 0  # rows whose every assistant token was cut off
    tokens: int = 0
    assistant_tokens: int = 0  # tokens with mask 1 (the ones trained on)
    longest_row_tokens: int = 0  # before truncation


@dataclass
class PromptLengthStats:
    """GRPO prompt lengths in tokens (nearest-rank percentiles) and the prompt-length filter."""

    prompt_tokens_p50: int | None = None
    prompt_tokens_p90: int | None = None
    prompt_tokens_p99: int | None = None
    prompt_tokens_max: int | None = None
    max_prompt_length: int | None = None  # --max-prompt-length
    prompt_length_percentile: float | None = None  # --prompt-length-percentile
    percentile_tokens: int | None = None  # that percentile's length
    prompt_length_threshold: int | None = None  # the smaller of the two limits: longer prompts are dropped
    dropped_long_prompts: int = 0  # = dropped_over_max_prompt_length + dropped_over_percentile
    dropped_over_max_prompt_length: int = 0
    dropped_over_percentile: int = 0


@dataclass
class PrepStats:
    """What data prep did with one dataset, in named fields (see the module docstring for the keys).

    Attributes:
        rows_in: rows read from --dataset.
        format: the row format used.
        num_rows: training rows kept.
        eval_rows: held-out rows (--eval-dataset or --eval-split-ratio); None for a prompt set.
        chat_template: the template's name (auto resolved); None for a prompt set.
        seconds: how long preparing took.
        num_samples_requested: --num-samples, when it asked for more rows than --dataset has.
        bad_rows: malformed rows dropped (--skip-bad-rows), of --dataset and --eval-dataset.
        bad_row_examples: a few of them, named ("row 5: column 'problem' is empty").
        dropped_long_eval_prompts: eval prompts over the prompt-length limit (GRPO with eval prompts).
        prompt_rendering: how GRPO prompts reach the model (the plan's `prompts` row).
        sft: SFT token counts (SFT only).
        prompts: GRPO prompt lengths and filter (GRPO only).
        other: keys of an older (or newer) metadata file that no field holds, kept as they are.
    """

    rows_in: int | None = None
    format: str | None = None
    num_rows: int = 0
    eval_rows: int | None = None
    chat_template: str | None = None
    seconds: float | None = None
    num_samples_requested: int | None = None
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    dropped_long_eval_prompts: int | None = None
    prompt_rendering: str | None = None
    sft: SFTTokenStats | None = None
    prompts: PromptLengthStats | None = None
    other: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The flat object the metadata JSON holds and `os-train data` prints: a field left at None
        (not applicable) is left out, as are no bad-row examples; every field of a group is written."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("sft", "prompts"):
                out.update(dataclasses.asdict(value) if value is not None else {})
            elif f.name == "other":
                out.update(value)
            elif f.name == "bad_row_examples":
                if value:
                    out[f.name] = list(value)
            elif value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrepStats:
        """Read `to_dict`'s object back (from a metadata file of this or an older version)."""
        data = dict(data)
        groups = {}
        for name, kind in (("sft", SFTTokenStats), ("prompts", PromptLengthStats)):
            keys = [f.name for f in dataclasses.fields(kind)]
            # A group's first counter marks it: SFT rows have token counts, GRPO rows prompt lengths.
            marker = "tokens" if kind is SFTTokenStats else "prompt_tokens_p50"
            groups[name] = kind(**{k: data.pop(k) for k in keys if k in data}) if marker in data else None
        own = {f.name for f in dataclasses.fields(cls)} - {"sft", "prompts", "other"}
        fields = {k: data.pop(k) for k in list(data) if k in own}
        return cls(**fields, **groups, other=data)


def describe_drops(stats: PrepStats) -> list[str]:
    """What data prep dropped, clamped or could not honour, one phrase per kind, from a prepared
    dataset's stats (shown in the plan, logged when prepared). Empty when every row was used whole."""
    notes = []
    if stats.num_samples_requested:
        notes.append(f"--num-samples {stats.num_samples_requested} is more than the "
                     f"{plural(stats.rows_in, 'row')} of --dataset: all {stats.rows_in} used")
    if stats.bad_rows:
        notes.append(f"{plural(stats.bad_rows, 'malformed row')} dropped (--skip-bad-rows)")
    p = stats.prompts
    if p is not None and p.dropped_over_max_prompt_length:
        notes.append(f"{plural(p.dropped_over_max_prompt_length, 'prompt')} longer than "
                     f"--max-prompt-length {p.max_prompt_length} dropped")
    if p is not None and p.dropped_over_percentile:
        notes.append(f"{plural(p.dropped_over_percentile, 'prompt')} longer than "
                     f"--prompt-length-percentile {p.prompt_length_percentile} "
                     f"({p.percentile_tokens} tokens) dropped")
    if stats.dropped_long_eval_prompts:
        notes.append(f"{plural(stats.dropped_long_eval_prompts, 'eval prompt')} over the prompt-length "
                     "limit dropped")
    s = stats.sft
    if s is not None and s.truncated_rows:
        notes.append(f"{plural(s.truncated_rows, 'row')} truncated to --max-seq-length "
                     f"{s.max_seq_length if s.max_seq_length is not None else ''}".rstrip())
    if s is not None and s.dropped_no_assistant_tokens:
        notes.append(f"{plural(s.dropped_no_assistant_tokens, 'row')} dropped: no assistant tokens left "
                     "after truncation")
    return notes
