#!/usr/bin/env python
"""``mm plot``, kept at this path: ``python tools/plot_metrics.py ARGS`` runs ``mm plot ARGS``."""
import sys

from mm.cli import main as mm


def main(argv: list[str] | None = None) -> int:
    return mm(["plot", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
