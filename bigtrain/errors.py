"""User-facing errors: bad recipe, flags, data or checkpoint. One line, exit code 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, flags, data, checkpoint): one line, exit code 2."""
