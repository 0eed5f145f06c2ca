"""The one exception type for mistakes a user can fix, and how every command reports it."""
import sys

EXIT_USAGE = 2  # exit status of every command for a user mistake


class MMError(Exception):
    """A user-facing error: bad input, a bad config, a missing or unsafe file."""


def report(exc: BaseException) -> int:
    """Print ``exc`` as the one ``mm: error: ...`` line on stderr; return EXIT_USAGE for the caller to exit with."""
    print(f"mm: error: {exc}", file=sys.stderr, flush=True)
    return EXIT_USAGE
