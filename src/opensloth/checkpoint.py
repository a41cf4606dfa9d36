"""Checkpoints that resume exactly and that an interrupted save can never corrupt.

Layout: `output_dir/checkpoints/checkpoint-<step>/`, the same for both recipes.

- GRPO (our own loop) calls `save_checkpoint` / `load_checkpoint`: trainable weights, optimizer,
  scheduler, every worker's RNG state (python, numpy, torch, cuda; gathered to rank 0), and a
  recipe `state` dict (step, data position, GRPO state, ...). Rank 0 writes everything into a
  temp dir beside the final one, fsyncs each file, writes `manifest.json` (sha256 of every
  file) last, then renames the temp dir into place: a crash at any point leaves either the old
  set of checkpoints or the old set plus one complete new one.
- SFT uses the HF Trainer's own checkpointing, because `resume_from_checkpoint` already
  restores optimizer, scheduler, per-rank RNG and the data position exactly. The Trainer writes
  in place (not atomic), so `sft_checkpoint_callback` writes the same `manifest.json` after the
  Trainer finished a checkpoint; a directory without a valid manifest is never resumed from.

A checkpoint counts as complete when its manifest exists and every listed file has the listed
size and sha256. `find_latest_checkpoint` skips incomplete ones with a warning.

Ctrl-C / SIGTERM: `StopSignal` turns the first signal into a flag the training loop polls
(`stop_requested`, agreed across workers), so the loop saves a checkpoint at a step boundary
and exits; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from opensloth.errors import UserError, plural

logger = logging.getLogger("opensloth")

CHECKPOINTS_SUBDIR = "checkpoints"
PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "opensloth-checkpoint-v1"
_STEP_RE = re.compile(rf"^{PREFIX}(\d+)$")


# ------------------------------------------------------------------------------------------------
# RNG state
# ------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and (if present) every CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every worker's RNG state, in rank order, on every rank (one collective; [own] alone)."""
    own = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, own)
    return states


# ------------------------------------------------------------------------------------------------
# Manifest and atomic writes
# ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(ckpt_dir: Path, step: int) -> None:
    """Checksum every file under `ckpt_dir` (fsynced) and write manifest.json atomically, last."""
    ckpt_dir = Path(ckpt_dir)
    files = {}
    for path in sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync_file(path)
        rel = path.relative_to(ckpt_dir).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1))
    _fsync_file(tmp)
    os.replace(tmp, ckpt_dir / MANIFEST)
    _fsync_dir(ckpt_dir)


def verify_checkpoint(ckpt_dir: Path) -> str | None:
    """None if `ckpt_dir` is a complete checkpoint, else the reason it is not."""
    ckpt_dir = Path(ckpt_dir)
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the save was interrupted)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    for rel, meta in files.items():
        path = ckpt_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has the wrong size"
        if _sha256(path) != meta["sha256"]:
            return f"{rel} fails its checksum"
    return None


def checkpoint_step(ckpt_dir: Path) -> int | None:
    match = _STEP_RE.match(Path(ckpt_dir).name)
    return int(match.group(1)) if match else None


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_SUBDIR


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint dirs under output_dir/checkpoints (complete or not), oldest step first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in output_dir; incomplete or corrupt ones are skipped with a warning."""
    for ckpt in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        logger.warning("Skipping checkpoint %s: %s.", ckpt, problem)
    return None


def rotate_checkpoints(output_dir: Path, save_total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `save_total_limit`; returns what was deleted.

    Only complete checkpoints count and only older ones go, so the newest complete checkpoint is
    never deleted. Incomplete directories (a save killed midway) are removed once a newer
    complete checkpoint exists, since nothing can resume from them.
    """
    ckpts = list_checkpoints(output_dir)
    complete = [c for c in ckpts if (c / MANIFEST).is_file()]
    deleted: list[Path] = []
    if not complete:
        return deleted
    newest_step = checkpoint_step(complete[-1])
    for c in ckpts:
        if c not in complete and checkpoint_step(c) < newest_step:
            shutil.rmtree(c, ignore_errors=True)
            deleted.append(c)
    if save_total_limit is not None and len(complete) > save_total_limit:
        for c in complete[: len(complete) - max(save_total_limit, 1)]:
            shutil.rmtree(c, ignore_errors=True)
            deleted.append(c)
    # Stale temp dirs of saves that were killed midway.
    for tmp in checkpoints_root(output_dir).glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return deleted


def check_writable(output_dir: Path, option: str = "--output-dir") -> None:
    """Prove a file can be written in `output_dir` (created for the probe, then removed), before any long work.

    Raises:
        UserError: the directory (or a parent) cannot be created or written (read-only, no permission).
    """
    path = Path(output_dir).absolute()
    created = [p for p in [path, *path.parents] if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{option} {output_dir} is not writable ({reason}). Choose a directory you can write to."
                        ) from None
    finally:
        # Leave no empty directories behind if a later check fails; the run creates them again.
        for p in created:
            try:
                p.rmdir()
            except OSError:
                break


# ------------------------------------------------------------------------------------------------
# A full disk: one message naming the path and the space needed
# ------------------------------------------------------------------------------------------------

# ENOSPC (disk full), EFBIG (file size limit), EDQUOT (quota): the same remedy, the same message.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# safetensors (Rust) and torch.save (C++) report them as text: "No space left on device (os error 28)",
# "[enforce fail at inline_container.cc:...] . PytorchStreamWriter failed writing file ...: file write failed".
_DISK_FULL_TEXT = re.compile(r"No space left on device|File too large|Disk quota exceeded|os error (?:28|27|122)\b"
                             r"|file write failed|unexpected pos \d+ vs \d+")


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from (or while handling), outermost first."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def is_disk_full(exc: BaseException) -> bool:
    """Did `exc` (or an exception it was raised from) fail because the disk or a size limit is full?"""
    return any((isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) or _DISK_FULL_TEXT.search(str(e))
               for e in _chain(exc))


def _reason(exc: BaseException) -> str:
    """"No space left on device" / "File too large" / ... for `exc`'s chain."""
    text = " ".join(str(e) for e in _chain(exc))
    for errnum in DISK_FULL_ERRNOS:
        name = os.strerror(errnum)
        if name in text or f"os error {errnum}" in text or any(
                isinstance(e, OSError) and e.errno == errnum for e in _chain(exc)):
            return name + (" (a file size limit, ulimit -f)" if errnum == errno.EFBIG else "")
    return "a write failed (disk full or a file size limit)"


def _mb(num_bytes: float) -> str:
    """1234567 -> "1.2 MB"; below 10 MB in KB, so a small save does not read as "0.2 MB needed, 0.2 MB free"."""
    if num_bytes < 10 * 2**20:
        return f"{num_bytes / 2**10:.0f} KB"
    if num_bytes < 10 * 2**30:
        return f"{num_bytes / 2**20:.1f} MB"
    return f"{num_bytes / 2**30:.1f} GB"


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tensor_bytes(model: torch.nn.Module, trainable_only: bool) -> int:
    """Bytes of the model's (trainable) parameters: what a save of its weights writes, roughly."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def disk_full_error(exc: BaseException, what: str, path: Path, needed: int, after: str) -> UserError:
    """The one message for a save that ran out of space: what, where, how much, what is intact.

    Args:
        exc: the error of the failed write (its reason is named: disk full, file too large, quota).
        what: "the final model", "checkpoint-4", ...
        path: where it was being written.
        needed: an estimate of the bytes the save writes.
        after: what is intact and how to go on (a sentence).
    """
    free = free_bytes(path)
    reason = _reason(exc)
    if reason.startswith("a write failed") and free < needed:  # torch.save names no errno
        reason = os.strerror(errno.ENOSPC)
    return UserError(f"{reason} while writing {what} to {path}: it needs about {_mb(needed)} and "
                     f"{_mb(free)} is free there. {after}")


def last_checkpoint_sentence(output_dir: Path) -> str:
    """Where the trained weights survive after a failed save, and how to go on."""
    latest = find_latest_checkpoint(Path(output_dir))
    if latest is None:
        return ("No complete checkpoint exists yet (--save-steps N writes some), so this run's training is lost; "
                "free some space and run again.")
    return (f"The last checkpoint, {latest}, is intact: free some space and continue with --resume "
            f"(or use {latest / 'adapter' if (latest / 'adapter').is_dir() else latest} as --model).")


def discard_unsealed_checkpoint(output_dir: Path) -> Path | None:
    """Remove the newest checkpoint dir if it has no manifest (a save that failed midway; never resumed
    from) and is newer than every complete one, to give its space back; returns it, or None."""
    ckpts = list_checkpoints(output_dir)
    if not ckpts or (ckpts[-1] / MANIFEST).is_file():
        return None
    shutil.rmtree(ckpts[-1], ignore_errors=True)
    return ckpts[-1]


def training_disk_full_error(exc: BaseException, output_dir: Path, needed: int | None = None) -> UserError:
    """A write during training (an SFT checkpoint, metrics.jsonl, ...) that hit a full disk: one message.

    An unsealed SFT checkpoint (the HF Trainer writes in place) is removed first; the message names it,
    or else the file that failed.
    """
    unsealed = discard_unsealed_checkpoint(output_dir)
    if unsealed is not None:
        what, path = unsealed.name, unsealed.parent
    else:
        failed = next((getattr(e, "filename", None) for e in _chain(exc) if getattr(e, "filename", None)), None)
        what, path = ("a file", Path(failed)) if failed else ("the run's files", Path(output_dir))
    if needed is not None:
        return disk_full_error(exc, what, path, needed, last_checkpoint_sentence(output_dir))
    return UserError(f"{_reason(exc)} while writing {what} to {path} ({_mb(free_bytes(path))} free there). "
                     + last_checkpoint_sentence(output_dir))


def save_final_model(model: Any, tokenizer: Any, output_dir: Path, full_model: bool) -> None:
    """The end-of-run save (rank 0): the model and tokenizer into output_dir, then the curves PNG.

    `save_model` writes beside the files already there and moves the new ones in only once all are
    written, so a full disk leaves the previous final model (if any) as it was; the error says where
    the trained weights survive. A curves PNG that cannot be written is only a warning: the model is saved.

    Raises:
        UserError: the disk (or a size limit or quota) is full; names the path and the space needed.
    """
    from opensloth.models.saving import save_model, unwrap_model
    from opensloth.tracking import plot_metrics

    try:
        save_model(model, tokenizer, output_dir)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        needed = tensor_bytes(unwrap_model(model), trainable_only=not full_model)
        raise disk_full_error(exc, "the final model", Path(output_dir), needed,
                              "The files already there are unchanged (the new ones are moved in only once all "
                              "are written). " + last_checkpoint_sentence(output_dir)) from exc
    try:
        plot_metrics(output_dir)
    except Exception as exc:  # noqa: BLE001 - the model is saved; a missing PNG must not fail the run
        if not is_disk_full(exc):
            raise
        logger.warning("Could not write the training curves in %s (%s); `os plot %s` draws them later.",
                       output_dir, _reason(exc), output_dir)


# ------------------------------------------------------------------------------------------------
# config.yaml: what the run used, written once training starts
# ------------------------------------------------------------------------------------------------


def previous_config_name(ckpt: Path) -> str:
    """Where a resume keeps the config it replaces: config.until-step-<N>.yaml (N = the checkpoint's step)."""
    return f"config.until-step-{checkpoint_step(Path(ckpt)) or 0}.yaml"


def record_run_config(cfg: Any, resumed_from: Path | None) -> Path:
    """Write output_dir/config.yaml (atomically) once the run has loaded everything and starts training.

    Written this late so a start that fails (bad model, bad --target-modules, a checkpoint that does not
    fit) leaves the output dir as it was. A resume with changed options keeps the config it replaces as
    config.until-step-<N>.yaml: config.yaml is what the latest run used, the old one what trained steps 1..N.
    """
    from opensloth.config import config_to_yaml

    out = Path(cfg.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)  # (the launcher made it; a recipe called directly may not have)
    path = out / "config.yaml"
    text = config_to_yaml(cfg)
    if resumed_from is not None and path.is_file() and path.read_text() != text:
        os.replace(path, out / previous_config_name(resumed_from))
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    restart_metrics(out, resumed_from)
    return path


def restart_metrics(out: Path, resumed_from: Path | None) -> None:
    """Make output_dir/metrics.jsonl hold this run's steps once each, in order.

    A fresh run (into an --overwrite dir) starts the file anew. A resume from checkpoint-N keeps the rows
    of steps 1..N and moves the whole previous file to metrics.replaced-at-step-<N>.jsonl when it also has later
    steps, which the resumed run now trains again (the curves would otherwise show two step N+1).
    """
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    if resumed_from is None:
        path.unlink()
        return
    resumed_step = checkpoint_step(Path(resumed_from)) or 0
    kept, superseded = [], False
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a torn last line of a killed run
        if step <= resumed_step:
            kept.append(line + "\n")
        else:
            superseded = True
    if superseded:
        os.replace(path, out / f"metrics.replaced-at-step-{resumed_step}.jsonl")
        tmp = out / ".metrics.jsonl.tmp"
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Our own loop (GRPO): save / load
# ------------------------------------------------------------------------------------------------


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with requires_grad (LoRA matrices, or every weight with --full-finetune)."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    state: dict[str, Any] | None = None,
    save_total_limit: int | None = None,
    tokenizer: Any | None = None,
) -> Path | None:
    """Write checkpoint-<step> atomically; every worker calls it (RNG states are gathered).

    Args:
        output_dir: the run's --output-dir; checkpoints go to output_dir/checkpoints/.
        step: optimizer steps done so far (the checkpoint resumes at step + 1).
        model: the (PEFT) model; its trainable parameters are saved, plus a loadable adapter
            (`save_pretrained`) in adapter/ so a checkpoint also works as --model.
        optimizer, scheduler: saved with their `state_dict()`.
        state: recipe state (data position, GRPO state, ...), torch-serialisable.
        save_total_limit: keep at most this many complete checkpoints.
        tokenizer: saved into adapter/ beside the adapter when given.

    Returns:
        The final checkpoint directory on rank 0, None on other ranks.
    """
    rng_states = _gather_rng_states()
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step}-", dir=root))
    try:
        torch.save(trainable_state_dict(model), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"step": step, "state": state or {}, "rng": rng_states}, tmp / "trainer_state.pt")
        if hasattr(model, "save_pretrained"):
            from opensloth.models.saving import save_pretrained_trained

            save_pretrained_trained(model, tmp / "adapter")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "adapter")
        write_manifest(tmp, step)
        if final.exists():  # a stale dir from an earlier run or an interrupted save of this step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            # weights + two AdamW moments + the loadable adapter copy
            raise disk_full_error(exc, f"{PREFIX}{step}", root, 4 * tensor_bytes(model, trainable_only=True),
                                  last_checkpoint_sentence(output_dir)) from exc
        raise
    rotate_checkpoints(output_dir, save_total_limit)
    logger.info("Saved checkpoint %s", final)
    return final


def load_checkpoint(
    ckpt_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG state; returns {"step", "state"}.

    Raises:
        UserError: the checkpoint is incomplete, corrupt, or was saved by a different number of
            workers (its RNG streams would not line up).
    """
    ckpt_dir = Path(ckpt_dir)
    problem = verify_checkpoint(ckpt_dir)
    if problem is not None:
        raise UserError(f"Cannot resume from {ckpt_dir}: {problem}. Pick a complete checkpoint with "
                        f"--resume-from, or use --resume to take the newest complete one.")
    device = next(model.parameters()).device
    weights = torch.load(ckpt_dir / "trainable.pt", map_location=device)
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    unknown = [name for name in weights if name not in params]
    if missing or unknown:
        raise UserError(f"Checkpoint {ckpt_dir} does not match this model (missing {missing[:3]}, "
                        f"unexpected {unknown[:3]}): resume with the same --model and LoRA options.")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location=device))
    if scheduler is not None and (ckpt_dir / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt"))
    # Our own file (checksummed above): it holds numpy RNG state, which weights_only refuses.
    saved = torch.load(ckpt_dir / "trainer_state.pt", weights_only=False)
    rng = saved["rng"]
    if len(rng) != world_size:
        raise UserError(f"Checkpoint {ckpt_dir} was saved by {plural(len(rng), 'worker')} but this run has "
                        f"{world_size}: resume with the same --devices for an exact continuation.")
    restore_rng_state(rng[rank])
    return {"step": saved["step"], "state": saved["state"]}


def resolve_resume(output_dir: Path, resume: bool, resume_from: Path | None) -> Path | None:
    """The checkpoint to resume from (--resume-from, else newest complete with --resume), or None.

    Raises:
        UserError: --resume-from names a missing or incomplete checkpoint.
    """
    if resume_from is not None:
        path = Path(resume_from)
        if not path.is_dir():
            raise UserError(f"--resume-from {path}: no such directory. Pass a checkpoint directory such as "
                            f"{checkpoints_root(output_dir) / (PREFIX + '100')}.")
        problem = verify_checkpoint(path)
        if problem is not None:
            raise UserError(f"--resume-from {path} is not a complete checkpoint: {problem}. "
                            "Use --resume to take the newest complete one.")
        return path
    if resume:
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            logger.warning("--resume: no complete checkpoint in %s; starting from scratch.",
                           checkpoints_root(output_dir))
        return latest
    return None


# ------------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM: finish the step, save, exit
# ------------------------------------------------------------------------------------------------


class StopSignal:
    """First SIGINT/SIGTERM sets `.requested` (the loop saves and stops); a second SIGINT raises.

    Use as a context manager around the training loop; the old handlers come back on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Got %s: saving a checkpoint after this step, then stopping "
                       "(Ctrl-C again to stop at once).", signal.Signals(signum).name)

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def stop_requested(stop: StopSignal) -> bool:
    """True on every worker if any worker got a stop signal (one small collective when distributed).

    The agreed answer is also stored in `stop.requested`, so every worker knows afterwards that
    the run stopped early, not only the one the signal reached.
    """
    flag = bool(stop.requested)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        tensor = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        flag = bool(tensor.item() > 0)
    if flag:  # (never reset: a signal may arrive while the collective runs)
        stop.requested = True
    return flag


def stopped_message(output_dir: Path, step: int, total_steps: int) -> str:
    """What a run stopped by Ctrl-C/SIGTERM tells the user: where it stopped and how to go on."""
    latest = find_latest_checkpoint(Path(output_dir))
    where = f"the checkpoint is {latest}" if latest is not None else "no checkpoint was written"
    return (f"Stopped at step {step} of {total_steps}; {where}. The final model was not written: "
            f"continue with --resume (the same command plus --resume).")


# ------------------------------------------------------------------------------------------------
# SFT: the HF Trainer's own checkpoints, made trustworthy by a manifest written last
# ------------------------------------------------------------------------------------------------


def sft_checkpoint_callback(stop: StopSignal | None = None, save_total_limit: int | None = None):
    """A TrainerCallback that seals each Trainer checkpoint with a manifest, and saves on Ctrl-C.

    Give the Trainer `output_dir=<run output_dir>/checkpoints` so its checkpoint-<step> dirs land
    where `find_latest_checkpoint` looks, and `save_total_limit=None`: the Trainer's own rotation
    could delete the last sealed checkpoint before the new one is sealed, so rotation happens
    here, after sealing. With `stop`, a signal makes the Trainer save at the end of the current
    step and stop.
    """
    from transformers import TrainerCallback

    class _SealCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop is not None and stop_requested(stop):
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            # Every rank has written its own rng_state_<rank>.pth once all reach this point.
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
                if ckpt.is_dir():
                    write_manifest(ckpt, state.global_step)
                    rotate_checkpoints(Path(args.output_dir).parent, save_total_limit)
            return control

    return _SealCheckpoints()
