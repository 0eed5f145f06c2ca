#!/usr/bin/env python
"""Generate the synthetic, learnable shapes/colours/counts/words corpus (see mm/data/synthetic.py).

    tools/make_synthetic.py --out DIR [--n 2000] [--n-val N] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mm.errors import MMError, report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tools/make_synthetic.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n", type=int, default=2000, help="train documents per kind")
    parser.add_argument("--n-val", type=int, default=None, help="held-out documents per kind (default n/10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if DIR holds the same corpus")
    args = parser.parse_args(argv)
    try:
        if args.n < 1 or (args.n_val is not None and args.n_val < 0) or args.samples_per_shard < 1:
            raise MMError("--n and --samples-per-shard must be positive, --n-val non-negative")
        from mm.data.synthetic import make_synthetic

        out = make_synthetic(args.out, n=args.n, seed=args.seed, n_val=args.n_val,
                             samples_per_shard=args.samples_per_shard, overwrite=args.overwrite, progress=True)
    except MMError as exc:
        return report(exc)
    print(json.dumps(json.loads((out / "manifest.json").read_text())["docs_per_kind"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
