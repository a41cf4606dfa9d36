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

The final model (`save_final_model`) is saved here too. What else a run does to its output dir
(the lock, the resume checks, config.yaml, Ctrl-C) is `opensloth.rundir`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from opensloth.errors import UserError, disk_full_error, disk_full_reason, is_disk_full, plural

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
# The final model, and what a full disk leaves intact
# ------------------------------------------------------------------------------------------------


def tensor_bytes(model: torch.nn.Module, trainable_only: bool) -> int:
    """Bytes of the model's (trainable) parameters: what a save of its weights writes, roughly."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


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
                       output_dir, disk_full_reason(exc), output_dir)


# ------------------------------------------------------------------------------------------------
# SFT: the HF Trainer's own checkpoints, made trustworthy by a manifest written last
# ------------------------------------------------------------------------------------------------


def sft_checkpoint_callback(should_stop: Callable[[], bool] | None = None,
                           save_total_limit: int | None = None):
    """A TrainerCallback that seals each Trainer checkpoint with a manifest, and saves on Ctrl-C.

    Give the Trainer `output_dir=<run output_dir>/checkpoints` so its checkpoint-<step> dirs land
    where `find_latest_checkpoint` looks, and `save_total_limit=None`: the Trainer's own rotation
    could delete the last sealed checkpoint before the new one is sealed, so rotation happens
    here, after sealing. With `should_stop` (`lambda: rundir.stop_requested(stop)`), a Ctrl-C makes
    the Trainer save at the end of the current step and stop.
    """
    from transformers import TrainerCallback

    class _SealCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if should_stop is not None and should_stop():
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
