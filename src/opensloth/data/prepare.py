"""Prepare a dataset once, before the workers start: the recipe that ties the data modules together.

`prepare_sft_dataset(cfg, tokenizer, num_shards)` and `prepare_grpo_dataset(...)` run in the
launcher's process:

1. a directory from `os-train data` given as --dataset is used as it is (`prepared.open_prepared_dir`);
2. else the cache entry named by the config's fingerprint is reused when it exists (`cache`);
3. else the source is loaded (`sources`), its format detected (`rows`), the chat template resolved
   (`templates`), and the rows built: SFT rows tokenized with assistant masks (`sft_rows`), GRPO
   prompts rendered, tokenized and filtered by length (`grpo_prompts`);
4. the rows, their metadata and statistics (`stats`) are written atomically into the cache entry
   (`prepared`), which records the shard count; workers open it with `load_prepared(path)` and
   read their rows with `load_shard(rank)` (the sharding rule: `opensloth.data.prepared`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from opensloth.config import RunConfig
from opensloth.data.cache import PIPELINE_VERSION, entry_and_fingerprint, tokenizer_identity
from opensloth.data.formats import check_columns
from opensloth.data.grpo_prompts import build_grpo
from opensloth.data.prepared import PreparedDataset, load_prepared, open_prepared_dir, reshard, write_prepared
from opensloth.data.rows import detect_source_format
from opensloth.data.sft_rows import build_sft
from opensloth.data.sources import PREPARED_META, is_prepared_dir, load_source, source_identity
from opensloth.data.stats import describe_drops
from opensloth.data.templates import effective_system_prompt, resolve_template, resolve_template_name
from opensloth.errors import UserError, plural

logger = logging.getLogger("opensloth")


def prepare_sft_dataset(cfg: RunConfig, tokenizer: Any, num_shards: int) -> PreparedDataset:
    """Prepare (or reuse) the SFT rows of `cfg.data` for `num_shards` workers.

    The tokenizer is not modified; the template the rows were rendered with is
    `PreparedDataset.chat_template` (save it with the tokenizer).

    Raises:
        UserError: bad source, format, template, or rows (see `opensloth.data.sft_rows`).
    """
    return _prepare(cfg, tokenizer, num_shards, "sft")


def prepare_grpo_dataset(cfg: RunConfig, tokenizer: Any, num_shards: int) -> PreparedDataset:
    """Prepare (or reuse) the GRPO prompts of `cfg.data` for `num_shards` workers, dropping prompts
    longer than --max-prompt-length and, when given, the --prompt-length-percentile of the prompt
    lengths (both off by default; every drop is counted in the stats, see `describe_drops`)."""
    return _prepare(cfg, tokenizer, num_shards, "grpo")


def _prepare(cfg: RunConfig, tokenizer: Any, num_shards: int, recipe: str) -> PreparedDataset:
    d = cfg.data
    if not d.dataset:
        raise UserError(f"Missing --dataset: a hub dataset name, a local .json/.jsonl/.csv/.parquet file, "
                        f"a saved dataset directory, or a directory from `os-train data {recipe}`.")
    tok_id = tokenizer_identity(tokenizer)
    if is_prepared_dir(d.dataset):
        return open_prepared_dir(Path(d.dataset).expanduser(), tok_id, num_shards, recipe)

    # A cache hit: the rows are as they would be rebuilt; only the shard count may differ.
    entry, key = entry_and_fingerprint(cfg, tokenizer, tok_id, recipe)
    if (entry / PREPARED_META).is_file() and not d.overwrite_cache:
        prepared = load_prepared(entry)
        logger.info("Reusing the prepared dataset %s (cache hit; --overwrite-cache rebuilds it)", entry)
        return reshard(prepared, num_shards)

    # Load the source (and --eval-dataset), fix its format and chat template.
    started = time.perf_counter()
    task = cfg.grpo.task if recipe == "grpo" else None  # steers the `auto` template
    hf_cache = entry.parent / "hf-datasets"
    source = load_source(d.dataset, d.dataset_split, d.dataset_config, hf_cache)
    fmt = d.format or detect_source_format(source, recipe, f"--dataset {d.dataset}")
    check_columns(fmt, source.column_names, recipe, f"--dataset {d.dataset}")
    template = resolve_template(tokenizer, d.chat_template, d.system_prompt, data_format=fmt, task=task,
                                variables=d.chat_template_kwargs)
    template_name = resolve_template_name(d.chat_template, fmt, task, tokenizer)
    _check_template_fits_format(template_name, fmt)
    system = effective_system_prompt(template_name, d.system_prompt)
    _warn_foreign_template(tokenizer, template, fmt)
    eval_source = None
    if d.eval_dataset:
        eval_source = load_source(d.eval_dataset, d.dataset_split, d.dataset_config, hf_cache, "--eval-dataset")
        check_columns(fmt, eval_source.column_names, recipe, f"--eval-dataset {d.eval_dataset}")

    # Build the rows: SFT token ids with assistant masks, or GRPO prompts.
    build = build_sft if recipe == "sft" else build_grpo
    train, held_out, stats = build(cfg, tokenizer, template, fmt, source, eval_source, system)
    stats.format = fmt
    stats.chat_template = template_name
    stats.seconds = round(time.perf_counter() - started, 2)

    # Write the entry atomically; a run that finished first with the same fingerprint wins.
    meta = {
        "version": PIPELINE_VERSION, "recipe": recipe, "format": fmt, "fingerprint": key,
        "num_shards": num_shards, "num_rows": len(train), "num_eval_rows": len(held_out) if held_out else 0,
        "tokenizer": tok_id["name"], "tokenizer_hash": tok_id["hash"], "template": d.chat_template,
        "chat_template": template, "system_prompt": d.system_prompt, "max_length": d.max_seq_length,
        "source": source_identity(d.dataset, d.dataset_split, d.dataset_config), "seed": cfg.training.seed,
        "num_samples": d.num_samples, "stats": stats.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not write_prepared(entry, train, held_out, meta, replace=d.overwrite_cache):
        logger.info("Another run prepared %s meanwhile; using it", entry)
        return reshard(load_prepared(entry), num_shards)
    logger.info("Prepared %s (%s) in %.1fs: %s", plural(len(train), "row"), recipe, stats.seconds, entry)
    notes = describe_drops(stats)
    if notes:  # the same summary is in the plan table
        logger.warning("Data prep: %s", "; ".join(notes))
    return PreparedDataset(path=entry, meta=meta, cache_hit=False)


def _check_template_fits_format(template_name: str, fmt: str) -> None:
    """Refuse a chat template that prompts for another answer layout than the format's rows hold."""
    if template_name == "r1-zero" and fmt == "openmath-reasoning":
        raise UserError("--format openmath-reasoning writes the <start_working_out> ... <SOLUTION> format, but "
                        "--chat-template r1-zero prompts for <think> ... </think> <answer> ... </answer>. Use "
                        "--chat-template reasoning with it, or give prompt-completion rows whose completion is "
                        "'<think> reasoning </think> <answer> answer </answer>'.")


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
