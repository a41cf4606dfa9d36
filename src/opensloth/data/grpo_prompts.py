"""GRPO prompts: each row's prompt and answer, rendered and tokenized as the model will be given them.

Each row is `prompt` (in its original form: the dataset's text, or the conversation: the dataset's
messages, or the one a math format builds), `prompt_text` (what the model is given), `prompt_ids`,
`answer`, and every other source column (rewards get them as keyword arguments, and `prompt` as
`prompts`, as TRL passes them). Prompts longer than --max-prompt-length, and, when given, than the
--prompt-length-percentile of the prompt lengths, are dropped (both off by default; counted in the
stats). Each of the run's rewards may refuse the dataset first (`RewardFunction.check_dataset`, e.g.
code_correctness's check that every assert test can be graded safely).

Prompt rendering. A conversation is rendered with the chat template and its generation prompt. A
text prompt (the prompt-answer format's `prompt` column holding a string) is given to the model as
it is, without a chat template, and tokenized with the tokenizer's special tokens, as TRL's
GRPOTrainer does; an explicit --chat-template (not `auto`) or a --system-prompt makes it a user turn
rendered with the template instead. The plan's `prompts` row says which (`prompt_rendering`).

`prompt_set` is the tokenizer-free variant (the prepare_dataset script without --model): the
prompt/answer rows that `os-train grpo --dataset DIR` later renders and tokenizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from opensloth.config import DataConfig, RunConfig
from opensloth.data.formats import check_columns, format_grpo_row
from opensloth.data.rows import (
    TOKENIZE_CHUNK,
    data_progress,
    detect_source_format,
    format_rows,
    format_train_and_eval,
    seeded_order,
    split_eval,
)
from opensloth.data.sources import is_prepared_dir, load_source, row_name
from opensloth.data.stats import PrepStats, PromptLengthStats
from opensloth.data.templates import render, resolve_template_name
from opensloth.errors import UserError

GRPO_OWN_COLUMNS = ("prompt", "prompt_text", "prompt_ids", "answer")


class GRPORow(NamedTuple):
    """One formatted GRPO row: the conversation, the reference answer, extra columns, and the prompt as
    the dataset holds it (the text of a prompt-answer row whose prompt is a string, else `messages`)."""

    messages: list
    answer: str | None
    extra: dict
    prompt: Any


def format_grpo_prompt(fmt: str, row: dict, system_prompt: str | None = None, default_system: bool = True) -> GRPORow:
    """format_grpo_row, keeping a text prompt's original form (TRL passes rewards the dataset's prompt)."""
    messages, answer, extra = format_grpo_row(fmt, row, system_prompt, default_system)
    text = row.get("prompt") if fmt == "prompt-answer" else None
    return GRPORow(messages, answer, extra, text if isinstance(text, str) else messages)


def prompt_rendering(cfg: RunConfig, fmt: str, tokenizer: Any, rows: list[GRPORow]) -> tuple[bool, str]:
    """(True when text prompts go to the model raw, the plan's line saying how the prompts are rendered).

    Raw, as TRL renders a text prompt, unless --chat-template (other than `auto`), --system-prompt or
    --chat-template-kwargs asks for a chat; conversations always go through the chat template.
    """
    d = cfg.data
    template = resolve_template_name(d.chat_template, fmt, cfg.grpo.task, tokenizer)
    has_text = any(isinstance(row.prompt, str) for row in rows)
    raw = fmt == "prompt-answer" and d.chat_template == "auto" and not d.system_prompt and not d.chat_template_kwargs
    parts = []
    if has_text and raw:
        parts.append("text prompts as they are, no chat template (as TRL renders them; --chat-template NAME "
                     "applies one)")
    elif has_text:
        why = (f"--chat-template {d.chat_template}" if d.chat_template != "auto" else
               "--system-prompt" if d.system_prompt else "--chat-template-kwargs")
        parts.append(f"text prompts as a user turn, chat template {template} ({why})")
    if any(not isinstance(row.prompt, str) for row in rows):
        built = f", built by the {fmt} format" if fmt != "prompt-answer" else ""
        parts.append(f"conversations{built}, chat template {template}")
    return raw, "; ".join(parts)


def nearest_rank(values: list[int], q: float) -> int:
    """The nearest-rank q-quantile of `values` (q in (0, 1]; q = 1 gives the maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def build_grpo(cfg: RunConfig, tokenizer: Any, template: str, fmt: str, source, eval_source,
               system: str | None) -> tuple[Any, Any, PrepStats]:
    """(training rows, held-out rows or None, stats): `source` (and `eval_source`) formatted in the seeded
    order, checked by the run's rewards, rendered, tokenized and filtered by prompt length;
    --eval-split-ratio holds out the last rows.

    Raises:
        UserError: a malformed row (without --skip-bad-rows), a row a reward refuses, or no row left.
    """
    d, g = cfg.data, cfg.grpo
    stats = PrepStats(rows_in=len(source))
    rows, eval_rows = format_train_and_eval(cfg, source, eval_source, fmt, format_grpo_prompt, system, stats)
    if not rows:
        raise UserError("No usable GRPO rows are left after dropping malformed ones. Check --dataset and --format.")
    rewards = run_reward_names(cfg)
    check_with_rewards(source, rewards, f"--dataset {d.dataset}", d.dataset)
    if eval_source is not None:
        check_with_rewards(eval_source, rewards, f"--eval-dataset {d.eval_dataset}", d.eval_dataset)

    raw, stats.prompt_rendering = prompt_rendering(cfg, fmt, tokenizer, [row for _, row in rows])
    texts, ids = _render_prompts(tokenizer, template, [row for _, row in rows], raw)
    lengths = [len(x) for x in ids]
    keep, stats.prompts = prompt_length_filter(lengths, g.max_prompt_length, g.prompt_length_percentile)
    if not keep:
        raise UserError(f"Every prompt is longer than --max-prompt-length {g.max_prompt_length} tokens; "
                        f"the shortest has {min(lengths)}. Raise --max-prompt-length.")
    rows = [rows[i] for i in keep]
    texts, ids = [texts[i] for i in keep], [ids[i] for i in keep]

    held_out = None
    if eval_rows:
        threshold = stats.prompts.prompt_length_threshold
        e_texts, e_ids = _render_prompts(tokenizer, template, [row for _, row in eval_rows], raw, "eval prompts")
        fits = [i for i, x in enumerate(e_ids) if threshold is None or len(x) <= threshold]
        stats.dropped_long_eval_prompts = len(e_ids) - len(fits)
        held_out = _grpo_dataset(eval_source, [eval_rows[i] for i in fits], [e_texts[i] for i in fits],
                                 [e_ids[i] for i in fits])
    n_eval = split_eval(len(rows), d.eval_split_ratio) if held_out is None else 0
    if n_eval:
        held_out = _grpo_dataset(source, rows[-n_eval:], texts[-n_eval:], ids[-n_eval:])
        rows, texts, ids = rows[:-n_eval], texts[:-n_eval], ids[:-n_eval]
    train = _grpo_dataset(source, rows, texts, ids)
    stats.num_rows = len(train)
    stats.eval_rows = len(held_out) if held_out is not None else 0
    return train, held_out, stats


def prompt_length_filter(lengths: list[int], max_prompt_length: int | None,
                         percentile: float | None) -> tuple[list[int], PromptLengthStats]:
    """(indices of the prompts kept, the length stats): every prompt that fits --max-prompt-length and,
    when given, the --prompt-length-percentile of `lengths` (opt-in); neither given keeps them all."""
    percentile_tokens = nearest_rank(lengths, percentile) if percentile is not None else None
    limits = [x for x in (max_prompt_length, percentile_tokens) if x is not None]
    threshold = min(limits) if limits else None
    keep = [i for i, n in enumerate(lengths) if threshold is None or n <= threshold]
    over_max = sum(max_prompt_length is not None and n > max_prompt_length for n in lengths)
    return keep, PromptLengthStats(
        prompt_tokens_p50=nearest_rank(lengths, 0.5), prompt_tokens_p90=nearest_rank(lengths, 0.9),
        prompt_tokens_p99=nearest_rank(lengths, 0.99), prompt_tokens_max=max(lengths),
        max_prompt_length=max_prompt_length, prompt_length_percentile=percentile,
        percentile_tokens=percentile_tokens, prompt_length_threshold=threshold,
        dropped_long_prompts=len(lengths) - len(keep), dropped_over_max_prompt_length=over_max,
        dropped_over_percentile=len(lengths) - len(keep) - over_max,
    )


def run_reward_names(cfg: RunConfig) -> list[str]:
    """The run's reward names as the recipe combines them: the --task preset's, then --rewards."""
    from opensloth.rewards.base import PRESETS

    return [*PRESETS.get(cfg.grpo.task or "", []), *cfg.grpo.rewards]


def check_with_rewards(rows, reward_names: list[str] | tuple, where: str, spec: str | None) -> None:
    """Let each of the run's rewards refuse, now, a dataset it cannot score (`RewardFunction.check_dataset`;
    e.g. code_correctness names the first assert test it cannot split safely).

    Args:
        rows: the source dataset (`datasets.Dataset`).
        reward_names: the run's rewards; a name not registered (yet) is skipped, as `resolve_rewards`
            reports unknown names.
        where: the option and dataset, for the message (e.g. "--dataset data.jsonl").
        spec: the dataset's path or name, so a message can name a .jsonl row by its line (`row_name`).

    Raises:
        UserError: a reward refused the dataset (its message).
    """
    import opensloth.rewards  # noqa: F401 - registers the built-in rewards
    from opensloth.rewards.base import registered_rewards

    name_row: Callable[[int], str] = lambda index: row_name(spec, index)  # noqa: E731
    for reward in registered_rewards(reward_names):
        reward.check_dataset(rows, where, name_row)


# The source columns each GRPO format reads; a prompt set replaces them with `prompt` and `answer`.
FORMAT_SOURCE_COLUMNS = {"dapo-math": ("prompt", "solution"), "gsm8k": ("question", "answer"),
                         "question-answer": ("question", "problem", "answer"), "prompt-answer": ("prompt", "answer")}


def prompt_set(d: DataConfig, seed: int, rewards: list[str] | tuple = ()) -> tuple[Any, PrepStats]:
    """The GRPO prompt set of `d.dataset` without a tokenizer: what `os-train grpo --dataset DIR` then
    renders with its chat template and tokenizes (a `datasets.Dataset` and its stats). `rewards` are the
    reward names training will use: each may refuse the rows first (`check_with_rewards`).

    Rows are taken in the seeded order (the first --num-samples of it) as training takes them. Each
    row's `prompt` is the conversation (the dataset's messages, or the one its format builds, with
    --system-prompt as the system turn when given; the math formats' default reasoning system prompt is
    left to the chat template chosen at training time), `answer` the reference answer, then the
    format's extra columns (gsm8k: `reference_solution`) and every other source column. The source
    columns the format reads (FORMAT_SOURCE_COLUMNS) are replaced, so the set reads as the
    prompt-answer format.

    Raises:
        UserError: bad source, format or rows; a kept column that would make the set read as another format.
    """
    import datasets

    if not d.dataset:
        raise UserError("Missing --dataset: a hub dataset name, a local .json/.jsonl/.csv/.parquet file, or a "
                        "saved dataset directory.")
    if is_prepared_dir(d.dataset):
        raise UserError(f"--dataset {d.dataset} is already prepared (tokenized) by `os-train data`; pass it to "
                        "`os-train grpo --dataset` as it is.")
    source = load_source(d.dataset, d.dataset_split, d.dataset_config)
    fmt = d.format or detect_source_format(source, "grpo", f"--dataset {d.dataset}")
    check_columns(fmt, source.column_names, "grpo", f"--dataset {d.dataset}")
    stats = PrepStats(rows_in=len(source), format=fmt)
    if d.num_samples and d.num_samples > len(source):
        stats.num_samples_requested = d.num_samples
    order = seeded_order(len(source), seed, d.num_samples)

    def without_default_system(fmt: str, row: dict, system_prompt: str | None) -> GRPORow:
        return format_grpo_prompt(fmt, row, system_prompt, default_system=False)

    rows = format_rows(source, order, fmt, without_default_system, d.system_prompt, d.skip_bad_rows,
                       f"--dataset {d.dataset}", stats, d.dataset)
    if not rows:
        raise UserError("No usable GRPO rows are left after dropping malformed ones. Check --dataset and --format.")
    check_with_rewards(source, rewards, f"--dataset {d.dataset}", d.dataset)
    consumed = set(FORMAT_SOURCE_COLUMNS[fmt]) | set(GRPO_OWN_COLUMNS)
    extra_keys = sorted({k for _, row in rows for k in row.extra})
    kept = [c for c in source.column_names if c not in consumed and c not in extra_keys]
    new = datasets.Dataset.from_dict({
        "prompt": [row.messages for _, row in rows],
        "answer": [row.answer for _, row in rows],
        **{k: [row.extra.get(k) for _, row in rows] for k in extra_keys},
    })
    out = new
    if kept:
        passthrough = source.select_columns(kept).select([index for index, _ in rows]).flatten_indices()
        out = datasets.concatenate_datasets([passthrough, new], axis=1)
    reads_as = detect_source_format(out, "grpo")
    if reads_as != "prompt-answer":
        clash = [c for c in kept if c in {c for cols in FORMAT_SOURCE_COLUMNS.values() for c in cols}]
        raise UserError(f"--dataset {d.dataset}: its column(s) {', '.join(clash)} would make `os-train grpo` read "
                        f"the prompt set as the {reads_as} format, not prompt-answer. Drop or rename them.")
    stats.num_rows = len(out)
    return out, stats


def _render_prompts(tokenizer: Any, template: str, rows: list[GRPORow], raw: bool,
                    stage: str = "prompts") -> tuple[list, list]:
    """(what the model is given, its token ids) for each row, chunk by chunk with progress: a text prompt
    as it is with the tokenizer's special tokens when `raw` (as TRL), else the conversation rendered with
    the template and its generation prompt (the template's own tokens, no extra special tokens)."""
    texts: list[str] = []
    ids: list[list[int]] = []
    with data_progress(f"render and tokenize {stage}", len(rows)) as progress:
        for start in range(0, len(rows), TOKENIZE_CHUNK):
            chunk = rows[start:start + TOKENIZE_CHUNK]
            is_raw = [raw and isinstance(row.prompt, str) for row in chunk]
            chunk_texts = [row.prompt if r else render(tokenizer, row.messages, True, template)
                           for row, r in zip(chunk, is_raw)]
            chunk_ids: list = [None] * len(chunk)
            for flag in (True, False):
                where = [i for i, r in enumerate(is_raw) if r == flag]
                if where:
                    encoded = tokenizer([chunk_texts[i] for i in where], add_special_tokens=flag)["input_ids"]
                    for i, e in zip(where, encoded):
                        chunk_ids[i] = e
            texts += chunk_texts
            ids += chunk_ids
            progress.update(len(texts))
    return texts, ids


def _grpo_dataset(source, rows: list, texts: list[str], ids: list[list[int]]):
    """The kept source rows with their other columns, plus prompt, prompt_text, prompt_ids, answer."""
    import datasets

    indices = [index for index, _ in rows]
    extra_keys = sorted({k for _, row in rows for k in row.extra})
    own = set(GRPO_OWN_COLUMNS) | set(extra_keys)
    passthrough = source.select(indices).remove_columns([c for c in source.column_names if c in own])
    columns = {
        "prompt": [row.prompt for _, row in rows],
        "prompt_text": texts,
        "prompt_ids": [list(x) for x in ids],
        "answer": [row.answer for _, row in rows],
        **{k: [row.extra.get(k) for _, row in rows] for k in extra_keys},
    }
    new = datasets.Dataset.from_dict(columns)
    if not passthrough.column_names:
        return new
    return datasets.concatenate_datasets([passthrough.flatten_indices(), new], axis=1)
