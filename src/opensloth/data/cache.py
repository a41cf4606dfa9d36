"""The prepared-data cache: where it lives, the fingerprint that names an entry, and looking one up.

An entry is the directory `<cache>/<recipe>-<fingerprint[:24]>` (a prepared directory,
`opensloth.data.prepared`) with cache = --cache-dir, $OPENSLOTH_CACHE or ~/.cache/opensloth. The
fingerprint hashes the source identity (path + size + mtime, or hub name + split + config), the
format, the tokenizer (name + a hash of its full definition, `tokenizer_identity`), the chat template
option and texts, the system prompt, the max length, the sample count, the seed, the recipe and its
filters (GRPO prompt length), the eval settings, and PIPELINE_VERSION. A second run with the same
inputs reuses the entry (`cache_hit`); --overwrite-cache rebuilds it. The worker count is not in the
fingerprint: an entry prepared for another worker count is re-sharded (`prepared.reshard`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from opensloth.config import RunConfig
from opensloth.data.prepared import PreparedDataset, load_prepared
from opensloth.data.sources import PREPARED_META, is_prepared_dir, source_identity

# Bump when the same inputs would now give other rows or metadata: every older entry becomes a cache miss.
PIPELINE_VERSION = 4  # 2: SFT rows are tokenized in pieces at each generation prompt's end; 3: every drop counted;
# 4: GRPO text prompts kept as text and rendered raw (as TRL does) unless --chat-template/--system-prompt


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


def fingerprint(cfg: RunConfig, tokenizer: Any, tok_id: dict, recipe: str) -> str:
    """The full fingerprint (sha256 hex) of what decides this config's prepared rows (module docstring)."""
    d = cfg.data
    task = cfg.grpo.task if recipe == "grpo" else None  # steers the `auto` template
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
    if d.chat_template_kwargs:  # only when given: the fingerprints of runs without them stay as they were
        parts["chat_template_kwargs"] = d.chat_template_kwargs
    if recipe == "sft":
        parts["assistant_only_loss"] = cfg.sft.assistant_only_loss
    if recipe == "grpo":
        parts["prompt_filter"] = [cfg.grpo.max_prompt_length, cfg.grpo.prompt_length_percentile]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def entry_and_fingerprint(cfg: RunConfig, tokenizer: Any, tok_id: dict, recipe: str) -> tuple[Path, str]:
    """(cache directory, full fingerprint) of this config's prepared data."""
    key = fingerprint(cfg, tokenizer, tok_id, recipe)
    return cache_root(cfg.data.cache_dir) / f"{recipe}-{key[:24]}", key


def cache_entry(cfg: RunConfig, tokenizer: Any) -> Path:
    """The cache directory of this config's prepared data, whether or not it exists yet."""
    return entry_and_fingerprint(cfg, tokenizer, tokenizer_identity(tokenizer), cfg.recipe)[0]


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
