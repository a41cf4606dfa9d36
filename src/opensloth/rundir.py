"""The run directory (--output-dir) over a run's life: everything a run does to it except the checkpoints.

In the order a run meets them:

- `check_unlocked`, `check_writable`, `check_resume`: the launcher's checks before anything is
  written. A live run holding the dir is refused naming its pid; a dir that cannot be written is
  refused; a --resume may not train over a finished model or load a checkpoint whose shape
  changed (model, recipe, full fine-tune or LoRA, rank, alpha, target modules); other changed
  options are listed in a warning, and config.yaml records them.
- `RunLock(output_dir)`: `output_dir/.opensloth.lock`, held with `fcntl.flock` by the launcher for
  the whole run (its workers are its children and die with it) and released at exit, as pip and
  git lock their state directories. The file records the owner's pid, host and start time. The
  kernel drops a flock when its holder dies, so a lock left by a killed run is taken over, with a note.
- `record_run_config`: config.yaml, written once the run has loaded everything (a failed start
  leaves the dir as it was); a resume with changed options keeps the one it replaces as
  config.until-step-<N>.yaml (metrics.jsonl is restarted by `tracking.MetricsLogger(restart=True)`).
- `StopSignal` / `stop_requested` / `stopped_message`: Ctrl-C or SIGTERM becomes a flag the
  training loop polls (agreed across workers), so the loop saves a checkpoint at a step boundary
  and exits; a second Ctrl-C interrupts at once.
- `training_disk_full_error`: a write during training that hit a full disk, as one message
  naming what failed, where, and which checkpoint is intact (the message itself: `errors.disk_full_error`).

Checkpoints themselves (save, load, seal, rotate, pick the one to resume) are `opensloth.checkpoint`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml

from opensloth.checkpoint import (
    CHECKPOINTS_SUBDIR,
    checkpoint_step,
    discard_unsealed_checkpoint,
    find_latest_checkpoint,
    last_checkpoint_sentence,
)
from opensloth.config import RunConfig, config_to_yaml
from opensloth.errors import (
    UserError,
    disk_full_error,
    disk_full_reason,
    exception_chain,
    format_size,
    free_bytes,
)

logger = logging.getLogger("opensloth")

# ------------------------------------------------------------------------------------------------
# The lock: one live run per output dir
# ------------------------------------------------------------------------------------------------


LOCK_FILE = ".opensloth.lock"

# Options whose change makes a checkpoint or adapter unloadable or a different object (section.field).
SHAPE_OPTIONS = ("recipe", "model.model", "model.full_finetune", "lora.lora_r", "lora.lora_alpha",
                 "lora.target_modules")
# Options that say how this invocation runs, not what is trained: never listed as changes.
IGNORED_OPTIONS = ("training.resume", "training.resume_from", "training.overwrite", "training.output_dir",
                   "logging.debug")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _in_use_error(output_dir: Path) -> UserError:
    path = Path(output_dir) / LOCK_FILE
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        owner = {}
    who = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"
    return UserError(f"--output-dir {output_dir} is in use by another run ({who}; lock file {path}). "
                     "Wait for it to finish or stop it, or choose another --output-dir (nothing was written).")


def _recorded_owner_alive(path: Path) -> bool:
    """Does the lock file name a live process on this host (other than this one)?"""
    try:
        owner = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    pid = owner.get("pid")
    return (owner.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid()
            and _pid_alive(pid))


def check_unlocked(output_dir: Path) -> None:
    """Refuse at once (writing nothing) when a live run holds `output_dir`'s lock.

    Raises:
        UserError: names the owner's pid, host and start time.
    """
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or unreadable: RunLock.acquire decides)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise _in_use_error(Path(output_dir)) from None
        raise
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on an output dir for the life of one run (a context manager).

    Args:
        output_dir: the run's --output-dir (created if missing, with its parents; those are removed
            again on release if the run left them empty, so a failed start leaves nothing behind).

    Raises:
        UserError: another live run holds the dir (names its pid, host and start time).
    """

    def __init__(self, output_dir: Path) -> None:
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_FILE
        self._fd: Optional[int] = None
        self._created: list[Path] = []  # directories this lock created, deepest first
        self.took_over: Optional[dict[str, Any]] = None  # the record of a dead owner, if any
        self.unlocked_reason: Optional[str] = None  # set when the filesystem cannot lock

    def acquire(self) -> RunLock:
        absolute = self.dir.absolute()
        self._created = [p for p in [absolute, *absolute.parents] if not p.exists()]
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    # A filesystem without locks (some network mounts): fall back to the recorded pid.
                    self.unlocked_reason = exc.strerror
                    if _recorded_owner_alive(self.path):
                        os.close(fd)
                        self._refuse()
                    break
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                self._refuse()
            # The holder we waited on may have unlinked the file between our open and our flock:
            # then we hold a lock on a file nobody else will open. Try again on the current file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        previous = os.read(fd, 4096)
        if previous.strip():
            try:
                self.took_over = json.loads(previous)
            except ValueError:
                self.took_over = {"pid": "?", "host": "?", "started": "?"}
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode())
        return self

    def _refuse(self) -> None:
        raise _in_use_error(self.dir)

    def stale_note(self) -> Optional[str]:
        """A line about the dead run whose lock this one took over (or about a filesystem that cannot
        lock), or None."""
        if self.unlocked_reason is not None:
            return (f"Warning: {self.dir} cannot be locked ({self.unlocked_reason}): a second run into it at the "
                    "same time would not be refused.")
        old = self.took_over
        if not old:
            return None
        here = old.get("host") == socket.gethostname()
        gone = "that process is gone" if here and isinstance(old.get("pid"), int) and not _pid_alive(old["pid"]) \
            else "its lock was released"
        return (f"Note: took over the lock of an earlier run in {self.dir} (pid {old.get('pid')} on host "
                f"{old.get('host')}, started {old.get('started')}; {gone}).")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        for path in self._created:  # only empty ones: a failed start leaves no directory behind
            try:
                path.rmdir()
            except OSError:
                break

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------
# Before anything is written: can the run write here?
# ------------------------------------------------------------------------------------------------


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
# What a --resume may continue
# ------------------------------------------------------------------------------------------------


def final_model_files(output_dir: Path) -> list[str]:
    """The final model's files in `output_dir` (a finished run), [] if there is none."""
    names = ("adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors",
             "model.safetensors.index.json")
    return [n for n in names if (Path(output_dir) / n).is_file()]


def flat_config(data: dict[str, Any]) -> dict[str, Any]:
    """{"training": {"learning_rate": 1e-4}, "recipe": "sft"} -> {"training.learning_rate": 1e-4, "recipe": "sft"}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                out[f"{key}.{sub}"] = sub_value
        else:
            out[key] = value
    return out


def config_changes(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Options whose value differs between two configs (nested dicts as in config.yaml).

    Returns:
        "section.field" -> (previous value, current value), without IGNORED_OPTIONS.
    """
    old, new = flat_config(previous), flat_config(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in IGNORED_OPTIONS and old.get(key) != new.get(key)}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """{"training.learning_rate": (1e-4, 2e-4)} -> "--learning-rate 0.0001 -> 0.0002"."""
    def flag(key: str) -> str:
        return "--" + key.split(".")[-1].replace("_", "-")

    def shown(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return "; ".join(f"{flag(k)} {shown(old)} -> {shown(new)}" for k, (old, new) in changes.items())


def _trains_longer(previous: dict[str, Any], cfg: RunConfig) -> bool:
    """Does this run train for more steps (or epochs) than the finished one recorded?"""
    old = previous.get("training", {})
    t = cfg.training
    old_steps = old.get("max_steps", -1)
    if t.max_steps > 0 and old_steps > 0:
        return t.max_steps > old_steps
    if t.max_steps <= 0 and old_steps <= 0:
        return t.num_train_epochs > old.get("num_train_epochs", 1.0)
    return False  # steps against epochs: cannot tell, refuse and let the user start a new run


def check_resume(cfg: RunConfig) -> list[str]:
    """Refuse a --resume that would destroy a finished model or cannot load what was saved.

    Args:
        cfg: the resolved config (nothing is written).

    Returns:
        Warning lines for the plan (changed options that the resumed run will use).

    Raises:
        UserError: a finished run with nothing to resume, or changed shape options.
    """
    t = cfg.training
    if not (t.resume or t.resume_from):
        return []
    out = Path(t.output_dir)
    config_path = out / "config.yaml"
    previous = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    current = json.loads(cfg.model_dump_json())
    finished = final_model_files(out)
    ckpt = Path(t.resume_from) if t.resume_from else find_latest_checkpoint(out)
    flag = f"--resume-from {t.resume_from}" if t.resume_from else "--resume"
    if finished and ckpt is None:
        raise UserError(
            f"{flag}: {out} holds a finished run ({finished[0]}) and no checkpoint, so there is nothing to "
            f"resume (--save-steps 0 keeps none). To train further, start a new run from it: --model {out} "
            f"--output-dir NEW_DIR (its adapter keeps training); next time pass --save-steps N to keep checkpoints "
            "that --resume with a larger --max-steps can continue. Nothing was written.")
    if finished and isinstance(previous, dict) and not _trains_longer(previous, cfg):
        old = previous.get("training", {})
        raise UserError(
            f"{flag}: {out} holds a finished run ({finished[0]}, --max-steps {old.get('max_steps')}, "
            f"--num-train-epochs {old.get('num_train_epochs')}) and this run would not train longer, so it would "
            "only retrain over it. To train further, raise --max-steps (it continues from the checkpoint "
            f"{ckpt} and replaces the final model when it finishes), or start a new run with --model {out} "
            "--output-dir NEW_DIR. Nothing was written.")
    if not isinstance(previous, dict) or ckpt is None:
        return []  # nothing is loaded: the run starts from scratch (the recipe says so)
    for config in (previous, current):  # the same model, however its path was spelt
        model = config.get("model", {}).get("model")
        if isinstance(model, str) and Path(model).expanduser().exists():
            config["model"]["model"] = str(Path(model).expanduser().resolve())
    changes = config_changes(previous, current)
    shape = {k: v for k, v in changes.items() if k in SHAPE_OPTIONS}
    if shape:
        raise UserError(
            f"{flag}: these options differ from the run in {out} and change the shape of what it saved: "
            f"{describe_changes(shape)}. Resume with the options in {config_path}, or start a new run in another "
            f"--output-dir (with --model {ckpt / 'adapter' if (ckpt / 'adapter').is_dir() else ckpt} to start from "
            "its weights). Nothing was written.")
    if not changes:
        return []
    kept = previous_config_name(ckpt)
    return [f"Warning: {flag} with changed options: {describe_changes(changes)}. The resumed run uses the new "
            f"values; config.yaml will record them and the previous one is kept as {out / kept} "
            f"(checkpoints: {out / CHECKPOINTS_SUBDIR})."]


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
    out = Path(cfg.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)  # (the launcher made it; a recipe called directly may not have)
    path = out / "config.yaml"
    text = config_to_yaml(cfg)
    if resumed_from is not None and path.is_file() and path.read_text() != text:
        os.replace(path, out / previous_config_name(resumed_from))
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


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
# A full disk during training
# ------------------------------------------------------------------------------------------------


def training_disk_full_error(exc: BaseException, output_dir: Path, needed: int | None = None) -> UserError:
    """A write during training (an SFT checkpoint, metrics.jsonl, ...) that hit a full disk: one message.

    An unsealed SFT checkpoint (the HF Trainer writes in place) is removed first; the message names it,
    or else the file that failed.
    """
    unsealed = discard_unsealed_checkpoint(output_dir)
    if unsealed is not None:
        what, path = unsealed.name, unsealed.parent
    else:
        failed = next((getattr(e, "filename", None) for e in exception_chain(exc) if getattr(e, "filename", None)), None)
        what, path = ("a file", Path(failed)) if failed else ("the run's files", Path(output_dir))
    if needed is not None:
        return disk_full_error(exc, what, path, needed, last_checkpoint_sentence(output_dir))
    return UserError(f"{disk_full_reason(exc)} while writing {what} to {path} ({format_size(free_bytes(path))} free there). "
                     + last_checkpoint_sentence(output_dir))
