#!/usr/bin/env python
"""``mm precompute-ref``, kept at this path: ``python tools/precompute_ref_logps.py ARGS`` is
``mm precompute-ref ARGS``."""
import sys

from mm.cli import main as mm


def main(argv: list[str] | None = None) -> int:
    return mm(["precompute-ref", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
