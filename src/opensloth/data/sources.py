"""Where rows come from: a hub dataset, a local .json/.jsonl/.csv/.parquet file, or a saved dataset
directory (`Dataset.save_to_disk`). A directory written by `os-train data` is recognised by the
caller (`opensloth.data.prepare`) before anything is loaded.

`load_source(spec, split, config, cache_dir)` returns the rows and a `source_identity` dict that
the cache fingerprint uses: path + size + modification time for local data, name + split +
config for the hub.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from opensloth.errors import UserError

logger = logging.getLogger("opensloth")

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = (".json", ".jsonl", ".csv")  # read as UTF-8 text (parquet is binary)
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
        if path.suffix.lower() in TEXT_SUFFIXES:
            # `datasets` reads non-UTF-8 bytes into Arrow and fails much later, deep in a row lookup.
            check_utf8(path, f"{option} {spec}")
        logger.info("Reading %s %s", option, spec)
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
        except Exception as exc:  # noqa: BLE001 - pyarrow / json errors: the file is malformed
            where = find_bad_json_line(path) if builder == "json" else None
            if where is not None:
                line, why = where
                raise UserError(
                    f"{option} {spec}, line {line}: not valid JSON ({why}). Each line of a {path.suffix} file "
                    'must be one JSON object, such as {"prompt": "...", "answer": "..."}: fix or remove that line.'
                ) from None
            raise UserError(f"{option} {spec}: could not read it as {path.suffix} "
                            f"({type(exc).__name__}: {_short(exc)}). Check the file's contents.") from None
    if path.suffix.lower() in FILE_BUILDERS or spec.startswith((".", "/", "~")):
        raise UserError(f"{option} {spec}: no such file. Check the path (relative paths start from "
                        f"{Path.cwd()}).")
    return _load_hub(spec, split, config, cache, option)


def row_name(spec: str | None, index: int) -> str:
    """How a user finds 0-based row `index` of a dataset: "row N" (counting from 1), or "row N (line M)"
    in a local .jsonl file whose blank lines make the two differ (the JSON reader skips them).

    Reads the file up to that line: for error messages only.
    """
    name = f"row {index + 1}"
    path = Path(spec).expanduser() if spec else None
    if path is None or path.suffix.lower() != ".jsonl" or not path.is_file():
        return name
    seen = -1
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line_number, line in enumerate(fh, start=1):
            seen += bool(line.strip())
            if seen == index:
                return name if line_number == index + 1 else f"{name} (line {line_number})"
    return name


def check_utf8(path: Path, what: str) -> None:
    """Raise a UserError naming the 1-based line of the first byte in `path` that is not UTF-8.

    Reads the file in 16 MiB chunks (about 1 s per GB), so a huge file is never held in memory.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 24)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                # exc.object is the decoder's pending bytes (never a newline) plus this chunk.
                line += exc.object[: exc.start].count(b"\n")
                raise UserError(
                    f"{what}, line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}). Save the file as "
                    f"UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8{path.suffix}."
                ) from None
            if not chunk:
                return
            line += chunk.count(b"\n")


def find_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(1-based line, what is wrong) of the first line of a JSON Lines file that is not one JSON object;
    for a .json file holding one document (an array), where that document breaks. None when the
    file parses (the problem is elsewhere)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as exc:
            if not text.lstrip().startswith("{"):  # one JSON document (an array), not JSON Lines
                return exc.lineno, f"{exc.msg} at column {exc.colno}"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return number, f"{exc.msg} at column {exc.colno}"
        if not isinstance(value, dict):
            return number, f"a JSON {type(value).__name__}, not an object"
    return None


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
