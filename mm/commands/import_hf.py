"""``mm import-hf``: import a transformers LLaVA directory as an mm model directory.

    mm import-hf --hf llava-hf-dir --out models/llava-mm

The result is an ordinary mm model directory: ``mm.load`` opens it with the same logits as the LLaVA model,
and recipes continue training from it with ``init_from``. A checkpoint with no exact mm equivalent is
refused with a message naming the part (exit 2).
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("import-hf", help="import a transformers LLaVA directory as an mm model",
                                   description=__doc__)
    parser.add_argument("--hf", required=True, help="transformers LLaVA directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="mm model directory to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mm.interop import import_llava
    from mm.train.preflight import writable_dir

    writable_dir(args.out, "--out", keep=False)  # before the checkpoint is read
    import_llava(args.hf, args.out)
    print(f"wrote mm model to {args.out}")
    return 0
