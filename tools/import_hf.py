#!/usr/bin/env python
"""``mm import-hf``, kept at this path: ``python tools/import_hf.py ARGS`` runs ``mm import-hf ARGS``."""
import sys

from mm.cli import main as mm


def main(argv: list[str] | None = None) -> int:
    return mm(["import-hf", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
