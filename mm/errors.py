"""The one exception type for mistakes a user can fix: the CLI prints it as one line and exits 2."""


class MMError(Exception):
    """A user-facing error: bad input, a bad config, a missing or unsafe file."""
