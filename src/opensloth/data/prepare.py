"""Tokenize, cache and shard a dataset once, before the workers start.

`prepare_sft_dataset(cfg, tokenizer, num_shards)` and `prepare_grpo_dataset(...)` run in the
launcher's process: load the source (`sources`), format each row (`formats`), render it with
the chat template (`templates`), tokenize, and save the result under a fingerprint in the cache.
Workers open it with `load_prepared(path)` and read their rows with `load_shard(rank)`.

Rows.
  SFT: `input_ids` and `assistant_masks` (1 exactly on the tokens of each assistant turn's
  content and its closing end-of-turn token, 0 on system/user turns and on the template's own
  tokens such as `<|im_start|>assistant\\n`), truncated to --max-seq-length. TRL's SFTTrainer
  turns `assistant_masks` into labels (-100 where 0) for such pre-tokenized rows. The `text`
  format has no turns: every token counts (mask all 1). A chat row is tokenized in pieces cut where
  each assistant turn's prompt (the turns before it and the generation prompt) ends, so it starts
  with exactly the tokens GRPO, eval and generate give the model (`generation_prompt_ends`; not
  for tokenizers that mark a word start at every input's start, see `piecewise_tokenization_is_exact`).
  GRPO: `prompt` (in its original form: the dataset's text, or the conversation: the dataset's
  messages, or the one a math format builds), `prompt_text` (what the model is given), `prompt_ids`,
  `answer`, and every other source column (rewards get them as keyword arguments, and `prompt` as
  `prompts`, as TRL passes them).

Prompt rendering (GRPO). A conversation is rendered with the chat template and its generation
prompt. A text prompt (the prompt-answer format's `prompt` column holding a string) is given to the
model as it is, without a chat template, and tokenized with the tokenizer's special tokens, as TRL's
GRPOTrainer does; an explicit --chat-template (not `auto`) or a --system-prompt makes it a user turn
rendered with the template instead. The plan's `prompts` row says which (`prompt_rendering` stat).

Assistant masks without template markers. For assistant turn i, the conversation up to turn i
and up to turn i+1 are rendered; the text between them is that turn, and the turn's content is
located in it (its last occurrence) up to the end of the turn minus trailing whitespace (which
keeps the end-of-turn token, drops the newline after it). Tokens whose character span (from the
fast tokenizer's offsets) overlaps that range get 1. This works for any template that renders a
conversation's prefix as a prefix of the whole, which the usual ones (ChatML, Llama 3, Mistral,
Gemma) do; a template that does not is refused with a clear message.

Cache. The directory is `<cache>/<recipe>-<fingerprint>` with cache = --cache-dir,
$OPENSLOTH_CACHE or ~/.cache/opensloth. The fingerprint hashes the source identity (path + size
+ mtime, or hub name + split + config), the format, the tokenizer (name + a hash of its full
definition), the chat template option and texts, the system prompt, the max length, the sample
count, the seed, the recipe and its filters (GRPO prompt length), the eval settings, and the
pipeline version. A second run with the same inputs reuses it (`cache_hit`); --overwrite-cache
rebuilds it. Writes go to a temporary directory renamed into place, so a killed run never leaves
a directory that looks complete. The worker count is not in the fingerprint: sharding is a view
(below), so an entry prepared for another worker count is re-sharded by rewriting its metadata.

Sharding rule. Rows are stored once, in the seeded global order (shuffled with --seed; the
first --num-samples rows of that order when given). With W shards, shard r holds global rows
r, r+W, r+2W, ... (`load_shard(r)`), so shards are disjoint and together hold every row, and for
ANY per-worker batch size b the k-th batch of b rows of each shard, taken together over the W
shards, is exactly the k-th batch of W*b rows of the global order: global rows k*W*b ...
(k+1)*W*b - 1. So W workers that each read their shard in order, b rows at a time, see together
what one worker reading the global order W*b rows at a time sees. `load_all()` gives the global
order itself: use it (not a concatenation of shards) where every worker reads the whole dataset
and a sampler splits it, as the HF Trainer does.

A directory written by `os-train data` (`--output-path`) passed as --dataset skips all of this;
it must have been prepared with the same tokenizer, for the same recipe and worker count
(`check_shards`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from opensloth.config import DataConfig, RunConfig
from opensloth.data.formats import (
    BadRow,
    check_columns,
    detect_format,
    format_grpo_row,
    format_sft_row,
)
from opensloth.data.sources import PREPARED_META, is_prepared_dir, load_source, row_name, source_identity
from opensloth.data.templates import effective_system_prompt, render, resolve_template, resolve_template_name
from opensloth.errors import UserError, plural
from opensloth.tracking import TrainingProgress

logger = logging.getLogger("opensloth")

PIPELINE_VERSION = 4  # 2: SFT rows are tokenized in pieces at each generation prompt's end; 3: every drop counted;
# 4: GRPO text prompts kept as text and rendered raw (as TRL does) unless --chat-template/--system-prompt
TOKENIZE_CHUNK = 512  # rows per batched tokenizer call
PROGRESS_LINE_INTERVAL_S = 10.0  # off a terminal: one progress line per stage at most this often


def data_progress(stage: str, total: int) -> TrainingProgress:
    """Progress of one data-prep stage (120k rows take a minute): a rich bar on a terminal, else a
    plain line at the first update, every PROGRESS_LINE_INTERVAL_S seconds, and at the end."""
    return TrainingProgress(total, description=f"prepare: {stage}", line_interval=PROGRESS_LINE_INTERVAL_S)


# ---------------------------------------------------------------------------------------------
# The prepared dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class PreparedDataset:
    """A prepared dataset directory: `opensloth_prepared.json`, `train/`, and `eval/` if any."""

    path: Path
    meta: dict
    cache_hit: bool = False

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def num_shards(self) -> int:
        return int(self.meta["num_shards"])

    @property
    def num_rows(self) -> int:
        return int(self.meta["num_rows"])

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self.meta.get("stats", {}))

    @property
    def recipe(self) -> str:
        return self.meta["recipe"]

    @property
    def chat_template(self) -> str | None:
        """The chat template the rows were rendered with (save it with the tokenizer)."""
        return self.meta.get("chat_template")

    def load_all(self):
        """Every training row, in the seeded global order (a memory-mapped `datasets.Dataset`)."""
        import datasets

        return datasets.load_from_disk(str(self.path / "train"))

    def load_shard(self, rank: int):
        """Worker `rank`'s rows: global rows rank, rank + W, rank + 2W, ... (module docstring)."""
        if not 0 <= rank < self.num_shards:
            raise ValueError(f"shard {rank} does not exist: {self.path} has {self.num_shards} shards")
        data = self.load_all()
        return data.select(range(rank, len(data), self.num_shards))

    def load_eval(self):
        """The held-out rows (--eval-dataset or --eval-split-ratio), or None."""
        import datasets

        path = self.path / "eval"
        return datasets.load_from_disk(str(path)) if path.is_dir() else None


def load_prepared(path: str | Path) -> PreparedDataset:
    """Open a prepared dataset directory (written by prepare_* or `os-train data`).

    Raises:
        UserError: the directory is not a prepared dataset.
    """
    path = Path(path).expanduser()
    meta_file = path / PREPARED_META
    if not meta_file.is_file():
        raise UserError(f"{path} is not a prepared dataset (no {PREPARED_META}). Prepare one with "
                        "`os-train data sft|grpo ... --output-path DIR`.")
    return PreparedDataset(path=path, meta=json.loads(meta_file.read_text()), cache_hit=True)


def check_shards(prepared: PreparedDataset, num_workers: int) -> None:
    """Refuse a prepared directory whose shard count is not this run's worker count."""
    if prepared.num_shards != num_workers:
        n, w = prepared.num_shards, num_workers
        raise UserError(
            f"--dataset {prepared.path} was prepared for {plural(n, 'worker')} but this run has {w}. "
            f"Re-run `os-train data {prepared.recipe} ... --num-workers {w} --output-path DIR` and pass DIR, "
            f"or pass --devices with {n} devices (e.g. --devices cpu:{n}, or {n} GPU ids)."
        )


def reshard(prepared: PreparedDataset, num_shards: int) -> PreparedDataset:
    """The same rows split for `num_shards` workers (metadata only; rows are not rewritten)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    if num_shards == prepared.num_shards:
        return prepared
    meta = dict(prepared.meta)
    meta["num_shards"] = num_shards
    meta["reshard_history"] = [*meta.get("reshard_history", []),
                               {"from": prepared.num_shards, "to": num_shards, "time": time.time()}]
    _write_json_atomic(prepared.path / PREPARED_META, meta)
    logger.info("Re-sharded %s from %d to %s", prepared.path, prepared.num_shards, plural(num_shards, "shard"))
    return PreparedDataset(path=prepared.path, meta=meta, cache_hit=prepared.cache_hit)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def prepare_sft_dataset(cfg: RunConfig, tokenizer: Any, num_shards: int) -> PreparedDataset:
    """Prepare (or reuse) the SFT rows of `cfg.data` for `num_shards` workers.

    The tokenizer is not modified; the template the rows were rendered with is
    `PreparedDataset.chat_template` (save it with the tokenizer).

    Raises:
        UserError: bad source, format, template, or rows (see the module docstring).
    """
    return _prepare(cfg, tokenizer, num_shards, "sft")


def prepare_grpo_dataset(cfg: RunConfig, tokenizer: Any, num_shards: int) -> PreparedDataset:
    """Prepare (or reuse) the GRPO prompts of `cfg.data` for `num_shards` workers, dropping prompts
    longer than --max-prompt-length and, when given, the --prompt-length-percentile of the prompt
    lengths (both off by default; every drop is counted in the stats, see `describe_drops`)."""
    return _prepare(cfg, tokenizer, num_shards, "grpo")


def cache_root(cache_dir: Path | None) -> Path:
    """--cache-dir, else $OPENSLOTH_CACHE, else ~/.cache/opensloth."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("OPENSLOTH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opensloth"


def tokenizer_identity(tokenizer: Any) -> dict[str, str]:
    """Name and a hash of what decides token ids: vocab, merges, added tokens, normalizer,
    pre-tokenizer, post-processor, and the eos/bos tokens (the text format appends eos).

    Padding and truncation settings are left out: calling the tokenizer with padding=True
    changes them (and they are saved with it), but never the ids of a row.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
        # The serializer writes version, truncation, padding, then added_tokens ... model; keep
        # from added_tokens on (parsing the JSON of a 150k vocabulary would take seconds).
        cut = definition.find('"added_tokens":')
        definition = definition[cut:] if cut >= 0 else definition
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    definition += json.dumps([str(tokenizer.eos_token), str(tokenizer.bos_token)])
    return {"name": str(getattr(tokenizer, "name_or_path", "")),
            "hash": hashlib.sha256(definition.encode()).hexdigest()}


def _prepare(cfg: RunConfig, tokenizer: Any, num_shards: int, recipe: str) -> PreparedDataset:
    d = cfg.data
    if not d.dataset:
        raise UserError(f"Missing --dataset: a hub dataset name, a local .json/.jsonl/.csv/.parquet file, "
                        f"a saved dataset directory, or a directory from `os-train data {recipe}`.")
    tok_id = tokenizer_identity(tokenizer)
    if is_prepared_dir(d.dataset):
        return _use_prepared_dir(Path(d.dataset).expanduser(), tokenizer, tok_id, num_shards, recipe)

    task = cfg.grpo.task if recipe == "grpo" else None  # steers the `auto` template
    entry, key = _cache_entry(cfg, tokenizer, tok_id, recipe)
    root = entry.parent
    if (entry / PREPARED_META).is_file() and not d.overwrite_cache:
        prepared = load_prepared(entry)
        logger.info("Reusing the prepared dataset %s (cache hit; --overwrite-cache rebuilds it)", entry)
        return reshard(prepared, num_shards)

    started = time.perf_counter()
    hf_cache = root / "hf-datasets"
    source = load_source(d.dataset, d.dataset_split, d.dataset_config, hf_cache)
    fmt = d.format or detect_source_format(source, recipe, f"--dataset {d.dataset}")
    check_columns(fmt, source.column_names, recipe, f"--dataset {d.dataset}")
    template = resolve_template(tokenizer, d.chat_template, d.system_prompt, data_format=fmt, task=task)
    template_name = resolve_template_name(d.chat_template, fmt, task, tokenizer)
    if template_name == "r1-zero" and fmt == "openmath-reasoning":
        raise UserError("--format openmath-reasoning writes the <start_working_out> ... <SOLUTION> format, but "
                        "--chat-template r1-zero prompts for <think> ... </think> <answer> ... </answer>. Use "
                        "--chat-template reasoning with it, or give prompt-completion rows whose completion is "
                        "'<think> reasoning </think> <answer> answer </answer>'.")
    system = effective_system_prompt(template_name, d.system_prompt)
    _warn_foreign_template(tokenizer, template, fmt)
    eval_source = None
    if d.eval_dataset:
        eval_source = load_source(d.eval_dataset, d.dataset_split, d.dataset_config, hf_cache, "--eval-dataset")
        check_columns(fmt, eval_source.column_names, recipe, f"--eval-dataset {d.eval_dataset}")

    build = _build_sft if recipe == "sft" else _build_grpo
    train, held_out, stats = build(cfg, tokenizer, template, fmt, source, eval_source, system)
    stats["format"] = fmt
    stats["chat_template"] = template_name
    stats["seconds"] = round(time.perf_counter() - started, 2)
    meta = {
        "version": PIPELINE_VERSION, "recipe": recipe, "format": fmt, "fingerprint": key,
        "num_shards": num_shards, "num_rows": len(train), "num_eval_rows": len(held_out) if held_out else 0,
        "tokenizer": tok_id["name"], "tokenizer_hash": tok_id["hash"], "template": d.chat_template,
        "chat_template": template, "system_prompt": d.system_prompt, "max_length": d.max_seq_length,
        "source": source_identity(d.dataset, d.dataset_split, d.dataset_config), "seed": cfg.training.seed,
        "num_samples": d.num_samples, "stats": stats, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not _write_entry(entry, train, held_out, meta, replace=d.overwrite_cache):
        logger.info("Another run prepared %s meanwhile; using it", entry)
        return reshard(load_prepared(entry), num_shards)
    logger.info("Prepared %s (%s) in %.1fs: %s", plural(len(train), "row"), recipe, stats["seconds"], entry)
    notes = describe_drops(stats)
    if notes:  # the same summary is in the plan table
        logger.warning("Data prep: %s", "; ".join(notes))
    return PreparedDataset(path=entry, meta=meta, cache_hit=False)


def _cache_entry(cfg: RunConfig, tokenizer: Any, tok_id: dict, recipe: str) -> tuple[Path, str]:
    """(cache directory, full fingerprint) of this config's prepared data."""
    task = cfg.grpo.task if recipe == "grpo" else None
    key = _fingerprint(cfg, tokenizer, tok_id, recipe, task)
    return cache_root(cfg.data.cache_dir) / f"{recipe}-{key[:24]}", key


def cache_entry(cfg: RunConfig, tokenizer: Any) -> Path:
    """The cache directory of this config's prepared data, whether or not it exists yet."""
    return _cache_entry(cfg, tokenizer, tokenizer_identity(tokenizer), cfg.recipe)[0]


def find_cached(cfg: RunConfig, tokenizer: Any) -> PreparedDataset | None:
    """The cache entry (or prepared --dataset directory) this config would use, without preparing
    anything (None on a cache miss or with --overwrite-cache): what a dry run can report."""
    d = cfg.data
    if not d.dataset:
        return None
    if is_prepared_dir(d.dataset):
        return load_prepared(d.dataset)
    entry = cache_entry(cfg, tokenizer)
    if d.overwrite_cache or not (entry / PREPARED_META).is_file():
        return None
    return load_prepared(entry)


def _warn_foreign_template(tokenizer: Any, template: str, fmt: str) -> None:
    """ChatML-style templates end turns with <|im_end|>: say so when this tokenizer lacks it."""
    if fmt == "text" or "<|im_end|>" not in template:
        return
    if "<|im_end|>" not in tokenizer.get_vocab():
        logger.warning(
            "The chat template ends turns with <|im_end|>, which is not a token of %s (its end of turn is %s): "
            "generation will not stop at the end of an answer. Prefer --chat-template model (the model's own) "
            "or a Jinja file written for this model.", getattr(tokenizer, "name_or_path", "this tokenizer"),
            tokenizer.eos_token)


def _use_prepared_dir(path: Path, tokenizer: Any, tok_id: dict, num_shards: int, recipe: str) -> PreparedDataset:
    prepared = load_prepared(path)
    if prepared.recipe != recipe:
        raise UserError(f"--dataset {path} was prepared for `os-train {prepared.recipe}`, not {recipe}. "
                        f"Prepare it with `os-train data {recipe}`.")
    if prepared.meta.get("tokenizer_hash") != tok_id["hash"]:
        raise UserError(f"--dataset {path} was tokenized with a different tokenizer "
                        f"({prepared.meta.get('tokenizer')}) than --model's ({tok_id['name']}). "
                        f"Re-run `os-train data {recipe}` with this --model.")
    check_shards(prepared, num_shards)
    logger.info("Using the prepared dataset %s as is: the data options (--format, --chat-template, "
                "--max-seq-length, ...) were fixed when it was prepared", path)
    return prepared


def _fingerprint(cfg: RunConfig, tokenizer: Any, tok_id: dict, recipe: str, task: str | None) -> str:
    d = cfg.data
    template_file = Path(d.chat_template).expanduser()
    parts = {
        "version": PIPELINE_VERSION, "recipe": recipe,
        "source": source_identity(d.dataset, d.dataset_split, d.dataset_config),
        "format": d.format, "tokenizer": tok_id,
        # auto/model resolve against the tokenizer's own template; a file by its text.
        "template": d.chat_template, "model_template": str(getattr(tokenizer, "chat_template", None)),
        "template_file": template_file.read_text() if template_file.is_file() else None,
        "system_prompt": d.system_prompt, "max_length": d.max_seq_length, "num_samples": d.num_samples,
        "seed": cfg.training.seed, "skip_bad_rows": d.skip_bad_rows, "task": task,
        "eval": [source_identity(d.eval_dataset, d.dataset_split, d.dataset_config) if d.eval_dataset else None,
                 d.eval_split_ratio],
    }
    if recipe == "sft":
        parts["assistant_only_loss"] = cfg.sft.assistant_only_loss
    if recipe == "grpo":
        parts["prompt_filter"] = [cfg.grpo.max_prompt_length, cfg.grpo.prompt_length_percentile]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Formatting rows (shared)
# ---------------------------------------------------------------------------------------------


def _seeded_order(n: int, seed: int, num_samples: int | None) -> list[int]:
    """Row indices in the seeded global order; the first `num_samples` of it when given."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:num_samples] if num_samples else order


def _training_order(cfg: RunConfig, source, stats: dict) -> list[int]:
    """The seeded order of the training rows; a --num-samples above the row count is noted, not refused
    (a hub dataset's size is rarely known in advance), in `stats` and the log."""
    d = cfg.data
    if d.num_samples and d.num_samples > len(source):
        stats["num_samples_requested"] = d.num_samples
        logger.warning("--num-samples %d is more than the %d rows of --dataset %s (in os eval: --limit): using all %d",
                       d.num_samples, len(source), d.dataset, len(source))
    return _seeded_order(len(source), cfg.training.seed, d.num_samples)


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


def describe_drops(stats: dict) -> list[str]:
    """What data prep dropped, clamped or could not honour, one phrase per kind, from a prepared
    dataset's stats (shown in the plan, logged when prepared). Empty when every row was used whole."""
    notes = []
    if stats.get("num_samples_requested"):
        notes.append(f"--num-samples {stats['num_samples_requested']} is more than the "
                     f"{plural(stats['rows_in'], 'row')} of --dataset: all {stats['rows_in']} used")
    if stats.get("bad_rows"):
        notes.append(f"{plural(stats['bad_rows'], 'malformed row')} dropped (--skip-bad-rows)")
    if stats.get("dropped_over_max_prompt_length"):
        notes.append(f"{plural(stats['dropped_over_max_prompt_length'], 'prompt')} longer than "
                     f"--max-prompt-length {stats['max_prompt_length']} dropped")
    if stats.get("dropped_over_percentile"):
        notes.append(f"{plural(stats['dropped_over_percentile'], 'prompt')} longer than "
                     f"--prompt-length-percentile {stats['prompt_length_percentile']} "
                     f"({stats['percentile_tokens']} tokens) dropped")
    if stats.get("dropped_long_eval_prompts"):
        notes.append(f"{plural(stats['dropped_long_eval_prompts'], 'eval prompt')} over the prompt-length "
                     "limit dropped")
    if stats.get("truncated_rows"):
        notes.append(f"{plural(stats['truncated_rows'], 'row')} truncated to --max-seq-length "
                     f"{stats.get('max_seq_length', '')}".rstrip())
    if stats.get("dropped_no_assistant_tokens"):
        notes.append(f"{plural(stats['dropped_no_assistant_tokens'], 'row')} dropped: no assistant tokens left "
                     "after truncation")
    return notes


def _format_rows(source, order: list[int], fmt: str, fn, system_prompt: str | None, skip: bool,
                 option: str, stats: dict, spec: str | None = None) -> list[tuple[int, Any]]:
    """Apply formatter `fn` to the rows `order`; a bad row stops the run unless `skip`.

    `spec` is the dataset's path or name: messages name a .jsonl row by its line too (`row_name`).
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
    stats["bad_rows"] = stats.get("bad_rows", 0) + len(bad)
    if bad:
        examples = [f"{row_name(spec, index)}: {exc}" for index, exc in bad[:3]]
        stats.setdefault("bad_row_examples", []).extend(examples)
        logger.warning("Dropped %s of %s (--skip-bad-rows), e.g. %s", plural(len(bad), "malformed row"), option,
                       examples[0])
    return out


def _split_eval(n: int, ratio: float) -> int:
    """How many of n rows the --eval-split-ratio holds out (at least 1 when ratio > 0, never all)."""
    if ratio <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * ratio)))


# ---------------------------------------------------------------------------------------------
# SFT: chat rendering with assistant masks
# ---------------------------------------------------------------------------------------------


def assistant_char_spans(tokenizer: Any, messages: list[dict],
                         chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and find each assistant turn's [start, end) characters in the text.

    Returns:
        (text, spans): the rendered conversation and, per assistant turn, the range from its
        content's first character to its end-of-turn token's last (module docstring).

    Raises:
        UserError: the template renders a prefix of the conversation differently from the whole.
    """
    full = render(tokenizer, messages, chat_template=chat_template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_prefix(tokenizer, messages[:i], chat_template)
        upto = render(tokenizer, messages[: i + 1], chat_template=chat_template)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise UserError(
                "The chat template renders the start of a conversation differently from the whole (e.g. it "
                "rewrites earlier assistant turns), so the assistant tokens cannot be located. Use "
                "--chat-template chatml or a Jinja file, or --no-assistant-only-loss."
            )
        turn = upto[len(before):]
        start = turn.rfind(message["content"].strip())
        if start < 0:
            raise UserError("The chat template changes the assistant message text, so its tokens cannot be "
                            "located. Use --chat-template chatml or a Jinja file.")
        spans.append((len(before) + start, len(before) + len(turn.rstrip())))
    return full, spans


def _render_prefix(tokenizer: Any, messages: list[dict], chat_template: str | None) -> str:
    if messages:
        return render(tokenizer, messages, chat_template=chat_template)
    try:  # some templates cannot render an empty conversation
        return tokenizer.apply_chat_template([], tokenize=False, chat_template=chat_template)
    except Exception:  # noqa: BLE001
        return ""


def generation_prompt_ends(tokenizer: Any, messages: list[dict], chat_template: str | None, full: str) -> list[int]:
    """Where, in the rendered conversation `full`, each assistant turn's prompt ends: the text of
    the turns before it plus the generation prompt, when `full` starts with that text.

    GRPO, `os eval` and `os generate` tokenize exactly that prompt and the model continues from its
    last token. A BPE tokenizer given the whole conversation may merge across that point: with
    Qwen2.5's BPE and the reasoning template (whose generation prompt ends with
    `<start_working_out>`), "<start_working_out>The" ends in the token `>The`, where the prompt alone
    ends in `>`. `tokenize_at_cuts` cuts the text there (when `piecewise_tokenization_is_exact`), so
    SFT trains on the token sequences the model is later prompted with.
    """
    ends = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        try:
            prompt = render(tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template)
        except UserError:  # a template that cannot render this prefix: no cut, as before
            continue
        if full.startswith(prompt):
            ends.append(len(prompt))
    return ends


def piecewise_tokenization_is_exact(tokenizer: Any) -> bool:
    """Does tokenizing a text in two pieces give back the text? Yes for byte-level BPE (GPT-2, Llama 3,
    Qwen); no for SentencePiece-style tokenizers that start every input with a word boundary
    (Llama 2, Mistral: "there" alone is "▁there"), for which `tokenize_at_cuts` must not cut."""
    pieces = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("Hi", "there")]
    return tokenizer.decode(pieces[0] + pieces[1]) == "Hithere"


def tokenize_at_cuts(tokenizer: Any, texts: list[str], cuts: list[list[int]],
                     offsets: bool = True) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Tokenize each text as its pieces between `cuts` (character positions), concatenated: no token
    spans a cut. Returns (ids, character offsets into the whole text; empty without `offsets`) per text.
    Without cuts this is the tokenizer on the whole text."""
    pieces, owners = [], []
    for row, (text, row_cuts) in enumerate(zip(texts, cuts, strict=True)):
        bounds = [0, *sorted({c for c in row_cuts if 0 < c < len(text)}), len(text)]
        for start, end in zip(bounds, bounds[1:]):
            pieces.append(text[start:end])
            owners.append((row, start))
    enc = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=offsets)
    out: list[tuple[list[int], list[tuple[int, int]]]] = [([], []) for _ in texts]
    for k, (row, start) in enumerate(owners):
        out[row][0].extend(enc["input_ids"][k])
        if offsets:
            out[row][1].extend((a + start, b + start) for a, b in enc["offset_mapping"][k])
    return out


def spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose [start, end) characters overlap an assistant span, else 0.

    Tokens of zero width (none in byte-level tokenizers) count when their start is inside a span.
    """
    mask = []
    for a, b in offsets:
        inside = any((a < e and b > s) or (a == b and s <= a < e) for s, e in spans)
        mask.append(int(inside))
    return mask


def _build_sft(cfg: RunConfig, tokenizer: Any, template: str, fmt: str, source, eval_source, system: str | None):
    import datasets

    d = cfg.data
    stats: dict[str, Any] = {"rows_in": len(source), "max_seq_length": d.max_seq_length}
    order = _training_order(cfg, source, stats)
    rows = _format_rows(source, order, fmt, format_sft_row, system, d.skip_bad_rows,
                        f"--dataset {d.dataset}", stats, d.dataset)
    eval_rows = None
    if eval_source is not None:
        eval_rows = _format_rows(eval_source, list(range(len(eval_source))), fmt, format_sft_row, system,
                                 d.skip_bad_rows, f"--eval-dataset {d.eval_dataset}", stats, d.eval_dataset)
    # --no-assistant-only-loss trains on every token: no masks to locate (mask all 1).
    only_assistant = cfg.sft.assistant_only_loss
    train = _tokenize_sft(tokenizer, template, [r for _, r in rows], fmt, d.max_seq_length, stats, only_assistant)
    held_out = (_tokenize_sft(tokenizer, template, [r for _, r in eval_rows], fmt, d.max_seq_length, {},
                              only_assistant) if eval_rows else None)
    if not train["input_ids"]:
        raise UserError("No usable SFT rows are left (see the bad-row and truncation counts). Check --dataset, "
                        "--format and --max-seq-length.")
    n_eval = _split_eval(len(train["input_ids"]), d.eval_split_ratio) if held_out is None else 0
    if n_eval:
        held_out = {k: v[-n_eval:] for k, v in train.items()}
        train = {k: v[:-n_eval] for k, v in train.items()}
    stats["num_rows"] = len(train["input_ids"])
    stats["eval_rows"] = len(held_out["input_ids"]) if held_out else 0
    to_ds = datasets.Dataset.from_dict
    return to_ds(train), (to_ds(held_out) if held_out else None), stats


def _tokenize_sft(tokenizer: Any, template: str, items: list, fmt: str, max_len: int,
                  stats: dict, only_assistant: bool = True) -> dict[str, list]:
    """Rendered, tokenized, masked and truncated rows; counts go into `stats`."""
    out: dict[str, list] = {"input_ids": [], "assistant_masks": []}
    truncated = dropped = total = trained = longest = 0
    can_cut = fmt != "text" and piecewise_tokenization_is_exact(tokenizer)
    with data_progress("tokenize", len(items)) as progress:
        for chunk_start in range(0, len(items), TOKENIZE_CHUNK):
            progress.update(chunk_start)
            chunk = items[chunk_start: chunk_start + TOKENIZE_CHUNK]
            if fmt == "text":
                encoded = tokenizer(chunk, add_special_tokens=True)["input_ids"]
                eos = tokenizer.eos_token_id
                pairs = [(ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else []), None)
                         for ids in encoded]
                pairs = [(ids, [1] * len(ids)) for ids, _ in pairs]
            else:
                if only_assistant:
                    rendered = [assistant_char_spans(tokenizer, messages, template) for messages in chunk]
                    if not getattr(tokenizer, "is_fast", False):
                        raise UserError("Assistant-only labels need a fast tokenizer (character offsets); "
                                        f"{getattr(tokenizer, 'name_or_path', 'this model')} has a slow one.")
                else:
                    rendered = [(render(tokenizer, messages, chat_template=template), []) for messages in chunk]
                cuts = [generation_prompt_ends(tokenizer, messages, template, text) if can_cut else []
                        for messages, (text, _) in zip(chunk, rendered)]
                encoded = tokenize_at_cuts(tokenizer, [text for text, _ in rendered], cuts, offsets=only_assistant)
                pairs = [(ids, spans_to_mask(offsets, spans) if only_assistant else [1] * len(ids))
                         for (ids, offsets), (_, spans) in zip(encoded, rendered)]
            for ids, mask in pairs:
                longest = max(longest, len(ids))
                if len(ids) > max_len:
                    truncated += 1
                    ids, mask = ids[:max_len], mask[:max_len]
                if not any(mask):  # nothing to learn from (all assistant tokens cut off)
                    dropped += 1
                    continue
                out["input_ids"].append(list(ids))
                out["assistant_masks"].append(mask)
                total += len(ids)
                trained += sum(mask)
        progress.update(len(items))
    stats.update(truncated_rows=truncated, dropped_no_assistant_tokens=dropped, tokens=total,
                 assistant_tokens=trained, longest_row_tokens=longest)
    if truncated:
        logger.warning("%s longer than --max-seq-length %d truncated", plural(truncated, "row"), max_len)
    return out


# ---------------------------------------------------------------------------------------------
# GRPO: prompts, answers and the prompt-length filter
# ---------------------------------------------------------------------------------------------

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

    Raw, as TRL renders a text prompt, unless --chat-template (other than `auto`) or --system-prompt
    asks for a chat; conversations always go through the chat template.
    """
    d = cfg.data
    template = resolve_template_name(d.chat_template, fmt, cfg.grpo.task, tokenizer)
    has_text = any(isinstance(row.prompt, str) for row in rows)
    raw = fmt == "prompt-answer" and d.chat_template == "auto" and not d.system_prompt
    parts = []
    if has_text and raw:
        parts.append("text prompts as they are, no chat template (as TRL renders them; --chat-template NAME "
                     "applies one)")
    elif has_text:
        why = f"--chat-template {d.chat_template}" if d.chat_template != "auto" else "--system-prompt"
        parts.append(f"text prompts as a user turn, chat template {template} ({why})")
    if any(not isinstance(row.prompt, str) for row in rows):
        built = f", built by the {fmt} format" if fmt != "prompt-answer" else ""
        parts.append(f"conversations{built}, chat template {template}")
    return raw, "; ".join(parts)


def nearest_rank(values: list[int], q: float) -> int:
    """The nearest-rank q-quantile of `values` (q in (0, 1]; q = 1 gives the maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _build_grpo(cfg: RunConfig, tokenizer: Any, template: str, fmt: str, source, eval_source, system: str | None):
    d, g = cfg.data, cfg.grpo
    stats: dict[str, Any] = {"rows_in": len(source)}
    order = _training_order(cfg, source, stats)
    rows = _format_rows(source, order, fmt, format_grpo_prompt, system, d.skip_bad_rows,
                        f"--dataset {d.dataset}", stats, d.dataset)
    eval_rows = None
    if eval_source is not None:
        eval_rows = _format_rows(eval_source, list(range(len(eval_source))), fmt, format_grpo_prompt, system,
                                 d.skip_bad_rows, f"--eval-dataset {d.eval_dataset}", stats, d.eval_dataset)
    if not rows:
        raise UserError("No usable GRPO rows are left after dropping malformed ones. Check --dataset and --format.")
    _check_code_tests(cfg, source, eval_source)

    raw, stats["prompt_rendering"] = prompt_rendering(cfg, fmt, tokenizer, [row for _, row in rows])
    texts, ids = _render_prompts(tokenizer, template, [row for _, row in rows], raw)
    lengths = [len(x) for x in ids]
    # Keep every prompt that fits --max-prompt-length; the percentile cut is opt-in.
    percentile_tokens = (nearest_rank(lengths, g.prompt_length_percentile)
                         if g.prompt_length_percentile is not None else None)
    limits = [x for x in (g.max_prompt_length, percentile_tokens) if x is not None]
    threshold = min(limits) if limits else None
    keep = [i for i, n in enumerate(lengths) if threshold is None or n <= threshold]
    over_max = sum(g.max_prompt_length is not None and n > g.max_prompt_length for n in lengths)
    stats.update(
        prompt_tokens_p50=nearest_rank(lengths, 0.5), prompt_tokens_p90=nearest_rank(lengths, 0.9),
        prompt_tokens_p99=nearest_rank(lengths, 0.99), prompt_tokens_max=max(lengths),
        prompt_length_threshold=threshold, dropped_long_prompts=len(rows) - len(keep),
        max_prompt_length=g.max_prompt_length, prompt_length_percentile=g.prompt_length_percentile,
        percentile_tokens=percentile_tokens, dropped_over_max_prompt_length=over_max,
        dropped_over_percentile=len(rows) - len(keep) - over_max,
    )
    if not keep:
        raise UserError(f"Every prompt is longer than --max-prompt-length {g.max_prompt_length} tokens; "
                        f"the shortest has {min(lengths)}. Raise --max-prompt-length.")
    rows = [rows[i] for i in keep]
    texts, ids = [texts[i] for i in keep], [ids[i] for i in keep]

    held_out = None
    if eval_rows:
        e_texts, e_ids = _render_prompts(tokenizer, template, [row for _, row in eval_rows], raw, "eval prompts")
        fits = [i for i, x in enumerate(e_ids) if threshold is None or len(x) <= threshold]
        stats["dropped_long_eval_prompts"] = len(e_ids) - len(fits)
        held_out = _grpo_dataset(eval_source, [eval_rows[i] for i in fits], [e_texts[i] for i in fits],
                                 [e_ids[i] for i in fits])
    n_eval = _split_eval(len(rows), d.eval_split_ratio) if held_out is None else 0
    if n_eval:
        held_out = _grpo_dataset(source, rows[-n_eval:], texts[-n_eval:], ids[-n_eval:])
        rows, texts, ids = rows[:-n_eval], texts[:-n_eval], ids[:-n_eval]
    train = _grpo_dataset(source, rows, texts, ids)
    stats["num_rows"] = len(train)
    stats["eval_rows"] = len(held_out) if held_out is not None else 0
    return train, held_out, stats


# The source columns each GRPO format reads; a prompt set replaces them with `prompt` and `answer`.
FORMAT_SOURCE_COLUMNS = {"dapo-math": ("prompt", "solution"), "gsm8k": ("question", "answer"),
                         "question-answer": ("question", "problem", "answer"), "prompt-answer": ("prompt", "answer")}


def prompt_set(d: DataConfig, seed: int, rewards: list[str] | tuple = ()):
    """The GRPO prompt set of `d.dataset` without a tokenizer: what `os-train grpo --dataset DIR` then
    renders with its chat template and tokenizes (a `datasets.Dataset` and its stats).

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

    from opensloth.rewards.code import check_dataset_tests

    if not d.dataset:
        raise UserError("Missing --dataset: a hub dataset name, a local .json/.jsonl/.csv/.parquet file, or a "
                        "saved dataset directory.")
    if is_prepared_dir(d.dataset):
        raise UserError(f"--dataset {d.dataset} is already prepared (tokenized) by `os-train data`; pass it to "
                        "`os-train grpo --dataset` as it is.")
    source = load_source(d.dataset, d.dataset_split, d.dataset_config)
    fmt = d.format or detect_source_format(source, "grpo", f"--dataset {d.dataset}")
    check_columns(fmt, source.column_names, "grpo", f"--dataset {d.dataset}")
    stats: dict[str, Any] = {"rows_in": len(source), "format": fmt}
    if d.num_samples and d.num_samples > len(source):
        stats["num_samples_requested"] = d.num_samples
    order = _seeded_order(len(source), seed, d.num_samples)

    def without_default_system(fmt: str, row: dict, system_prompt: str | None) -> GRPORow:
        return format_grpo_prompt(fmt, row, system_prompt, default_system=False)

    rows = _format_rows(source, order, fmt, without_default_system, d.system_prompt, d.skip_bad_rows,
                        f"--dataset {d.dataset}", stats, d.dataset)
    if not rows:
        raise UserError("No usable GRPO rows are left after dropping malformed ones. Check --dataset and --format.")
    check_dataset_tests(source, list(rewards), f"--dataset {d.dataset}", lambda index: row_name(d.dataset, index))
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
    stats["num_rows"] = len(out)
    return out, stats


def _check_code_tests(cfg: RunConfig, source, eval_source) -> None:
    """code_correctness grades assert tests only when it can split them safely: say which row cannot, now."""
    from opensloth.rewards.base import PRESETS
    from opensloth.rewards.code import check_dataset_tests

    rewards = [*PRESETS.get(cfg.grpo.task or "", []), *cfg.grpo.rewards]
    check_dataset_tests(source, rewards, f"--dataset {cfg.data.dataset}",
                        lambda index: row_name(cfg.data.dataset, index))
    if eval_source is not None:
        check_dataset_tests(eval_source, rewards, f"--eval-dataset {cfg.data.eval_dataset}",
                            lambda index: row_name(cfg.data.eval_dataset, index))


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


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _write_entry(entry: Path, train, held_out, meta: dict, replace: bool) -> bool:
    """Write into a temporary sibling, then rename it into place.

    An existing entry is replaced only when `replace` (--overwrite-cache); otherwise a run that
    finished first wins and this returns False (its rows are identical: same fingerprint).
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
    try:
        train.save_to_disk(str(tmp / "train"))
        if held_out is not None:
            held_out.save_to_disk(str(tmp / "eval"))
        (tmp / PREPARED_META).write_text(json.dumps(meta, indent=2, default=str))
        if entry.exists():
            if not replace:
                return False
            old = entry.parent / f".old-{entry.name}-{uuid.uuid4().hex[:8]}"
            entry.rename(old)
            tmp.rename(entry)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(entry)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
