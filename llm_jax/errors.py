"""The one exception type a user sees: a message that names the problem and the fix."""


class UserError(Exception):
    """Bad input or a state the user can fix. The CLI prints it without a traceback."""
