#!/usr/bin/env python
"""``mm make-synthetic``, kept at this path: ``python tools/make_synthetic.py ARGS`` runs ``mm make-synthetic ARGS``."""
import sys

from mm.cli import main as mm


def main(argv: list[str] | None = None) -> int:
    return mm(["make-synthetic", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
