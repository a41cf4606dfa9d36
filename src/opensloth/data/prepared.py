"""The prepared-dataset directory on disk: `PreparedDataset`, opening, checking, re-sharding, writing.

A prepared directory holds `opensloth_prepared.json` (the metadata: recipe, fingerprint, shard count,
tokenizer, templates, `stats` (`opensloth.data.stats`), ...), `train/` and, when there are held-out
rows, `eval/` (both `datasets.Dataset.save_to_disk` directories). `opensloth.data.prepare` writes them
into the cache; `os-train data --output-path DIR` copies one out; workers open it with
`load_prepared(path)` and read their rows with `load_shard(rank)`.

Writes are atomic: rows go to a temporary sibling directory renamed into place, metadata to a
temporary file renamed over the old one, so a killed run never leaves a directory that looks complete.

Sharding rule. Rows are stored once, in the seeded global order (shuffled with --seed; the
first --num-samples rows of that order when given). With W shards, shard r holds global rows
r, r+W, r+2W, ... (`load_shard(r)`), so shards are disjoint and together hold every row, and for
ANY per-worker batch size b the k-th batch of b rows of each shard, taken together over the W
shards, is exactly the k-th batch of W*b rows of the global order: global rows k*W*b ...
(k+1)*W*b - 1. So W workers that each read their shard in order, b rows at a time, see together
what one worker reading the global order W*b rows at a time sees. `load_all()` gives the global
order itself: use it (not a concatenation of shards) where every worker reads the whole dataset
and a sampler splits it, as the HF Trainer does. The worker count is not in the cache fingerprint:
sharding is a view, so an entry prepared for another worker count is re-sharded by rewriting its
metadata (`reshard`).

A directory written by `os-train data` (`--output-path`) passed as --dataset is used as it is; it
must have been prepared with the same tokenizer, for the same recipe and worker count
(`open_prepared_dir`, `check_shards`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from opensloth.data.sources import PREPARED_META
from opensloth.data.stats import PrepStats
from opensloth.errors import UserError, plural

logger = logging.getLogger("opensloth")


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
    def stats(self) -> PrepStats:
        """What prep read, kept and dropped (`PrepStats.to_dict()` for every key and value)."""
        return PrepStats.from_dict(self.meta.get("stats", {}))

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


def open_prepared_dir(path: Path, tok_id: dict, num_shards: int, recipe: str) -> PreparedDataset:
    """A directory from `os-train data` given as --dataset: used as it is, when it was prepared for this
    recipe, with this tokenizer (`tok_id`: `cache.tokenizer_identity`) and for this worker count.

    Raises:
        UserError: another recipe, tokenizer or worker count (the message says how to re-prepare it).
    """
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
    write_json_atomic(prepared.path / PREPARED_META, meta)
    logger.info("Re-sharded %s from %d to %s", prepared.path, prepared.num_shards, plural(num_shards, "shard"))
    return PreparedDataset(path=prepared.path, meta=meta, cache_hit=prepared.cache_hit)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` as JSON into a temporary sibling, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def write_prepared(entry: Path, train, held_out, meta: dict, replace: bool) -> bool:
    """Write a prepared directory (rows, held-out rows, metadata) into a temporary sibling, then rename
    it into place.

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
