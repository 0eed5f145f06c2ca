#!/usr/bin/env python
"""``mm inspect``, kept at this path: ``python tools/inspect_shards.py ARGS`` runs ``mm inspect ARGS``."""
import sys

from mm.cli import main as mm


def main(argv: list[str] | None = None) -> int:
    return mm(["inspect", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
