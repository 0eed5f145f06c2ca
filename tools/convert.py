#!/usr/bin/env python
"""``mm convert``, kept at this path: ``python tools/convert.py ARGS`` runs ``mm convert ARGS``."""
import sys

from mm.cli import main as mm


def main(argv: list[str] | None = None) -> int:
    return mm(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
