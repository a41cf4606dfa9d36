"""Where rows come from: a hub dataset, a local .json/.jsonl/.csv/.parquet file, or a saved dataset
directory (`Dataset.save_to_disk`). A directory written by `os-train data` is recognised by the
caller (`opensloth.data.prepare`) before anything is loaded.

`load_source(spec, split, config, cache_dir)` returns the rows and a `source_identity` dict that
the cache fingerprint uses: path + size + modification time for local data, name + split +
config for the hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from opensloth.errors import UserError

logger = logging.getLogger("opensloth")

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PREPARED_META = "opensloth_prepared.json"


def is_prepared_dir(spec: str | None) -> bool:
    """True for a directory written by `os-train data` (it holds opensloth_prepared.json)."""
    return bool(spec) and (Path(spec).expanduser() / PREPARED_META).is_file()


def source_identity(spec: str, split: str, config: str | None) -> dict[str, Any]:
    """What identifies the source rows for the cache: a changed file or dir gives a new identity."""
    path = Path(spec).expanduser()
    if path.is_file():
        stat = path.stat()
        return {"kind": "file", "path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            digest.update(f"{item.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return {"kind": "dir", "path": str(path.resolve()), "split": split, "files": digest.hexdigest()}
    return {"kind": "hub", "name": spec, "split": split, "config": config}


def load_source(spec: str, split: str = "train", config: str | None = None,
                cache_dir: Path | None = None, option: str = "--dataset"):
    """Load the rows of `spec` as a `datasets.Dataset`.

    Args:
        spec: hub name, local file, or saved dataset directory.
        split: split of a hub dataset or a saved DatasetDict (local files have one split).
        config: hub configuration name (--dataset-config).
        cache_dir: where `datasets` keeps its Arrow conversions (default: its own cache).
        option: the option named in error messages (--dataset or --eval-dataset).

    Raises:
        UserError: missing file, unsupported file kind, unreadable file, unknown split, or a hub
            dataset that cannot be downloaded (names the dataset and suggests a local file).
    """
    import datasets

    datasets.disable_progress_bars()
    path = Path(spec).expanduser()
    cache = str(cache_dir) if cache_dir is not None else None
    if path.is_dir():
        return _load_saved_dir(path, split, option)
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"{option} {spec}: the file is empty. Give a file with at least one row.")
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"{option} {spec}: unsupported file type {path.suffix!r}. Use .json, .jsonl, .csv or "
                            ".parquet, a saved dataset directory, or a hub dataset name.")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
        except Exception as exc:  # noqa: BLE001 - pyarrow / json errors: the file is malformed
            raise UserError(f"{option} {spec}: could not read it as {path.suffix} "
                            f"({type(exc).__name__}: {_short(exc)}). Check the file's contents.") from None
    if path.suffix.lower() in FILE_BUILDERS or spec.startswith((".", "/", "~")):
        raise UserError(f"{option} {spec}: no such file. Check the path (relative paths start from "
                        f"{Path.cwd()}).")
    return _load_hub(spec, split, config, cache, option)


def _load_saved_dir(path: Path, split: str, option: str):
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure means "not a saved dataset"
        raise UserError(f"{option} {path}: a directory, but not a saved dataset (Dataset.save_to_disk) "
                        f"nor a prepared one (os-train data): {_short(exc)}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"--dataset-split {split!r} is not in {path}; its splits are: {', '.join(data)}.")
        data = data[split]
    return data


def _load_hub(name: str, split: str, config: str | None, cache: str | None, option: str):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, cache_dir=cache)
    except ValueError as exc:
        text = str(exc)
        if "split" in text.lower():
            raise UserError(f"--dataset-split {split!r} is not a split of {name}: {_short(exc)}") from None
        if "config" in text.lower():
            raise UserError(f"--dataset-config {config!r} does not fit {name}: {_short(exc)}") from None
        raise UserError(f"{option} {name}: could not be loaded: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, gated repo, network errors
        raise UserError(
            f"{option} {name}: the dataset could not be downloaded from the Hugging Face hub "
            f"({type(exc).__name__}: {_short(exc)}). Check the name and your connection, or pass a local "
            ".json/.jsonl/.csv/.parquet file or a saved dataset directory."
        ) from None


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_prepared_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / PREPARED_META).read_text())
