"""The argument parser of every ``mm`` command: a bad flag is one ``mm: error: ...`` line and exit status 2."""
from __future__ import annotations

import argparse
import sys

from mm.errors import EXIT_USAGE, MMError, report


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors go through ``mm.errors.report``; subparsers inherit it."""

    intermixed = False  # True: flags may stand between positionals (``mm vqa a.png --json "q"``)
    _parsing_intermixed = False

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        """With ``intermixed``, argparse's intermixed parsing: all flags first, then the positionals that remain
        (plain parsing cannot give an optional positional its value once a flag follows it)."""
        if not self.intermixed or self._parsing_intermixed:
            return super().parse_known_args(args, namespace)
        self._parsing_intermixed = True  # parse_known_intermixed_args calls back here for each of its two passes
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing_intermixed = False

    def error(self, message: str):
        report(MMError(f"{message} (see '{self.prog} --help')"))
        sys.exit(EXIT_USAGE)
