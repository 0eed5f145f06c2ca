#!/usr/bin/env python
"""Import a transformers LLaVA directory as an mm model directory.

    python tools/import_hf.py --hf llava-hf-dir --out models/llava-mm

The result is an ordinary mm model directory: ``mm.load`` opens it with the same logits as the LLaVA model,
and recipes continue training from it with ``init_from``. A checkpoint with no exact mm equivalent is
refused with a message naming the part (exit 2).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--hf", required=True, help="transformers LLaVA directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="mm model directory to write")
    args = parser.parse_args(argv)

    from mm.errors import MMError, report
    from mm.interop import import_llava

    try:
        import_llava(args.hf, args.out)
    except MMError as exc:
        return report(exc)
    print(f"wrote mm model to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
