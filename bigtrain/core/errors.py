"""User-facing errors: bad recipe, flags, data or checkpoint. One line, exit code 2."""

import sys


class UserError(Exception):
    """A problem with the user's input (recipe, flags, data, checkpoint): one line, exit code 2."""


def say(line: str) -> None:
    """Write `line` to stderr in one write: every rank of a job shares the launcher's stderr, and print()'s
    separate newline write lets another rank's line land in between (two errors on one line)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
