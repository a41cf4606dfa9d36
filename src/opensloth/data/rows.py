"""The steps SFT and GRPO prep share, from a loaded source to formatted rows.

- `detect_source_format`: the row format a source's columns (and, for gsm8k, its answers) fit;
- `seeded_order` / `training_order`: the seeded global order of the rows (the first --num-samples);
- `format_rows`: each row through its format (`formats`), a malformed one refused or, under
  --skip-bad-rows, dropped and counted in the stats;
- `split_eval`: how many rows --eval-split-ratio holds out;
- `data_progress`: the progress bar (or plain lines) of one prep stage.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from opensloth.config import RunConfig
from opensloth.data.formats import BadRow, detect_format
from opensloth.data.sources import row_name
from opensloth.data.stats import PrepStats
from opensloth.errors import UserError, plural
from opensloth.tracking import TrainingProgress

logger = logging.getLogger("opensloth")

TOKENIZE_CHUNK = 512  # rows per batched tokenizer call
PROGRESS_LINE_INTERVAL_S = 10.0  # off a terminal: one progress line per stage at most this often


def data_progress(stage: str, total: int) -> TrainingProgress:
    """Progress of one data-prep stage (120k rows take a minute): a rich bar on a terminal, else a
    plain line at the first update, every PROGRESS_LINE_INTERVAL_S seconds, and at the end."""
    return TrainingProgress(total, description=f"prepare: {stage}", line_interval=PROGRESS_LINE_INTERVAL_S)


def detect_source_format(source, recipe: str, option: str = "--dataset") -> str:
    """`detect_format` on the columns; `question` + `answer` is gsm8k only when some answer holds its
    `####` line, else question-answer (plain answers, as in CS336's MATH prompts)."""
    fmt = detect_format(source.column_names, recipe, option)
    if fmt == "gsm8k" and not answers_hold_gsm8k_marks(source):
        return "question-answer"
    return fmt


def answers_hold_gsm8k_marks(source) -> bool:
    """Does any row's `answer` (text) contain `####`? One Arrow scan of the column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = source.data.column("answer")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return False
    return bool(pc.any(pc.match_substring(column, "####")).as_py())


def seeded_order(n: int, seed: int, num_samples: int | None) -> list[int]:
    """Row indices in the seeded global order; the first `num_samples` of it when given."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:num_samples] if num_samples else order


def training_order(cfg: RunConfig, source, stats: PrepStats) -> list[int]:
    """The seeded order of the training rows; a --num-samples above the row count is noted, not refused
    (a hub dataset's size is rarely known in advance), in `stats` and the log."""
    d = cfg.data
    if d.num_samples and d.num_samples > len(source):
        stats.num_samples_requested = d.num_samples
        logger.warning("--num-samples %d is more than the %d rows of --dataset %s (in os eval: --limit): using all %d",
                       d.num_samples, len(source), d.dataset, len(source))
    return seeded_order(len(source), cfg.training.seed, d.num_samples)


def format_rows(source, order: list[int], fmt: str, fn, system_prompt: str | None, skip: bool,
                option: str, stats: PrepStats, spec: str | None = None) -> list[tuple[int, Any]]:
    """Apply formatter `fn` to the rows `order`: (source index, formatted row) for each good row.

    A bad row stops the run unless `skip`; then it is dropped and counted in `stats` (bad_rows,
    with up to 3 examples per call). `spec` is the dataset's path or name: messages name a .jsonl
    row by its line too (`row_name`).
    """
    out, bad = [], []
    # One Arrow read of the selected rows; indexing row by row costs ~10x more.
    selected = source.select(order).to_list()
    with data_progress(f"format rows ({fmt})", len(order)) as progress:
        for done, (index, row) in enumerate(zip(order, selected), 1):
            if done % TOKENIZE_CHUNK == 0 or done == len(order):
                progress.update(done)
            try:
                out.append((index, fn(fmt, row, system_prompt)))
            except BadRow as exc:
                if not skip:
                    raise UserError(f"{row_name(spec, index).capitalize()} of {option} is malformed ({fmt} format): "
                                    f"{exc}. Fix the row (rows count from 1), or pass --skip-bad-rows to drop "
                                    "malformed rows (they are counted).") from None
                bad.append((index, exc))
    stats.bad_rows += len(bad)
    if bad:
        examples = [f"{row_name(spec, index)}: {exc}" for index, exc in bad[:3]]
        stats.bad_row_examples.extend(examples)
        logger.warning("Dropped %s of %s (--skip-bad-rows), e.g. %s", plural(len(bad), "malformed row"), option,
                       examples[0])
    return out


def format_train_and_eval(cfg: RunConfig, source, eval_source, fmt: str, fn, system_prompt: str | None,
                          stats: PrepStats) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]] | None]:
    """Both recipes' first step: the --dataset rows in the seeded training order and the --eval-dataset rows
    (None without one) in file order, each formatted by `fn` (see `format_rows`)."""
    d = cfg.data
    rows = format_rows(source, training_order(cfg, source, stats), fmt, fn, system_prompt, d.skip_bad_rows,
                       f"--dataset {d.dataset}", stats, d.dataset)
    if eval_source is None:
        return rows, None
    return rows, format_rows(eval_source, list(range(len(eval_source))), fmt, fn, system_prompt, d.skip_bad_rows,
                             f"--eval-dataset {d.eval_dataset}", stats, d.eval_dataset)


def split_eval(n: int, ratio: float) -> int:
    """How many of n rows the --eval-split-ratio holds out (at least 1 when ratio > 0, never all)."""
    if ratio <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * ratio)))
