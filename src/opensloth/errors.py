"""The one exception type for errors a user can cause.

The CLI catches `UserError`, prints its message (no traceback unless `--debug`) and exits
with status 2. Library code raises it for bad paths, bad columns, bad options and bad
rewards; anything else is a bug and keeps its traceback. `TrainingStopped` is neither: the
run was asked to stop (Ctrl-C, SIGTERM), saved a checkpoint, and exits with status 130 so that
scripts chaining stages (`set -e`) never take a stopped run for a finished one.

`plural` lives here too, with the messages: every count printed to a user ("1 worker", "2 rows")
goes through it, from any layer.
"""


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
