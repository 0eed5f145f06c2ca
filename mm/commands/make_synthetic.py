"""``mm make-synthetic``: generate the synthetic, learnable shapes/colours/counts/words corpus (mm/data/synthetic.py).

    mm make-synthetic --out DIR [--n 2000] [--n-val N] [--seed 0] [--scenes mixed|wide-words]

``--scenes wide-words``: every scene a small word on a wide (4:1) canvas, the OCR check of image layouts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm.errors import MMError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("make-synthetic", help="generate the synthetic learnable corpus",
                                   description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n", type=int, default=2000, help="train documents per kind")
    parser.add_argument("--n-val", type=int, default=None, help="held-out documents per kind (default n/10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--scenes", default="mixed", choices=("mixed", "wide-words"),
                        help="mixed: shapes and large words on 96 px squares (default); wide-words: small words "
                             "at random places on 384 x 96 canvases")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if DIR holds the same corpus")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Prints the documents per kind of each split as one JSON line."""
    if args.n < 1 or (args.n_val is not None and args.n_val < 0) or args.samples_per_shard < 1:
        raise MMError("--n and --samples-per-shard must be positive, --n-val non-negative")
    from mm.data.synthetic import make_synthetic
    from mm.train.preflight import writable_dir

    writable_dir(args.out, "--out", keep=False)
    out = make_synthetic(args.out, n=args.n, seed=args.seed, n_val=args.n_val,
                         samples_per_shard=args.samples_per_shard, overwrite=args.overwrite, progress=True,
                         scenes=args.scenes)
    print(json.dumps(json.loads((out / "manifest.json").read_text())["docs_per_kind"]))
    return 0
