"""The one exception type for errors a user can cause.

The CLI catches `UserError`, prints its message (no traceback unless `--debug`) and exits
with status 2. Library code raises it for bad paths, bad columns, bad options and bad
rewards; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error the user caused and can fix; the message names the option and the fix."""


class MissingExtraError(UserError, ImportError):
    """An optional package the chosen option needs is not installed; the message names the extra.

    An ImportError (as library users expect for a missing extra) that the CLI still prints as one
    clear line, like any other UserError.
    """
