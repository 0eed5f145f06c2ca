"""The argument parser of every ``mm`` command: a bad flag is one ``mm: error: ...`` line and exit status 2."""
from __future__ import annotations

import argparse
import sys

from mm.errors import EXIT_USAGE, MMError, report


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors go through ``mm.errors.report``; subparsers inherit it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        report(MMError(f"{message} (see '{self.prog} --help')"))
        sys.exit(EXIT_USAGE)
