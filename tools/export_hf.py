#!/usr/bin/env python
"""``mm export-hf``, kept at this path: ``python tools/export_hf.py ARGS`` runs ``mm export-hf ARGS``."""
import sys

from mm.cli import main as mm


def main(argv: list[str] | None = None) -> int:
    return mm(["export-hf", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
