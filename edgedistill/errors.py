"""User-facing errors.

Anything the user can fix (a path, a recipe key, a checkpoint that does not fit) raises
`UserError` with a one-line message naming the file and the fix. The CLI prints it without a
traceback and exits with code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""
