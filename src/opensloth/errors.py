"""The one exception type for errors a user can cause.

The CLI catches `UserError`, prints its message (no traceback unless `--debug`) and exits
with status 2. Library code raises it for bad paths, bad columns, bad options and bad
rewards; anything else is a bug and keeps its traceback. `TrainingStopped` is neither: the
run was asked to stop (Ctrl-C, SIGTERM), saved a checkpoint, and exits with status 130 so that
scripts chaining stages (`set -e`) never take a stopped run for a finished one.

`plural` lives here too, with the messages: every count printed to a user ("1 worker", "2 rows")
goes through it, from any layer. So does the one message for a full disk (`disk_full_error`), which
every save that runs out of space raises: a checkpoint, the final model, the run's own files.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path


class UserError(Exception):
    """An error the user caused and can fix; the message names the option and the fix."""


class MissingExtraError(UserError, ImportError):
    """An optional package the chosen option needs is not installed; the message names the extra.

    An ImportError (as library users expect for a missing extra) that the CLI still prints as one
    clear line, like any other UserError.
    """


class TrainingStopped(Exception):
    """Training stopped early on Ctrl-C/SIGTERM after saving a checkpoint (exit status 130).

    The final model is not written: the output dir holds only the checkpoint to `--resume` from.
    """


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """A count with its noun, singular for 1: every count printed to a user goes through this.

    Example:
        >>> plural(1, "worker"), plural(3, "optimizer update"), plural(2, "entry", "entries")
        ('1 worker', '3 optimizer updates', '2 entries')
    """
    return f"{count} {noun if count == 1 else plural_noun or noun + 's'}"


# ------------------------------------------------------------------------------------------------
# A full disk: one message naming the path and the space needed
# ------------------------------------------------------------------------------------------------

# ENOSPC (disk full), EFBIG (file size limit), EDQUOT (quota): the same remedy, the same message.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# safetensors (Rust) and torch.save (C++) report them as text: "No space left on device (os error 28)",
# "[enforce fail at inline_container.cc:...] . PytorchStreamWriter failed writing file ...: file write failed".
_DISK_FULL_TEXT = re.compile(r"No space left on device|File too large|Disk quota exceeded|os error (?:28|27|122)\b"
                             r"|file write failed|unexpected pos \d+ vs \d+")


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from (or while handling), outermost first."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def is_disk_full(exc: BaseException) -> bool:
    """Did `exc` (or an exception it was raised from) fail because the disk or a size limit is full?"""
    return any((isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) or _DISK_FULL_TEXT.search(str(e))
               for e in exception_chain(exc))


def disk_full_reason(exc: BaseException) -> str:
    """"No space left on device" / "File too large" / ... for `exc`'s chain."""
    text = " ".join(str(e) for e in exception_chain(exc))
    for errnum in DISK_FULL_ERRNOS:
        name = os.strerror(errnum)
        if name in text or f"os error {errnum}" in text or any(
                isinstance(e, OSError) and e.errno == errnum for e in exception_chain(exc)):
            return name + (" (a file size limit, ulimit -f)" if errnum == errno.EFBIG else "")
    return "a write failed (disk full or a file size limit)"


def format_size(num_bytes: float) -> str:
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
    reason = disk_full_reason(exc)
    if reason.startswith("a write failed") and free < needed:  # torch.save names no errno
        reason = os.strerror(errno.ENOSPC)
    return UserError(f"{reason} while writing {what} to {path}: it needs about {format_size(needed)} and "
                     f"{format_size(free)} is free there. {after}")
