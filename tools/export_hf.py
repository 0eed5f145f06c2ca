#!/usr/bin/env python
"""Export an mm model directory to a transformers LLaVA directory.

    python tools/export_hf.py --model runs/sft/final --out llava-hf-dir

The result loads with ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``
and gives mm's logits and greedy generations. Exportable: an ``hf:`` CLIP/SigLIP vision tower, a ``linear``
or ``mlp`` adapter, no modality experts; anything else is refused with a message naming the part (exit 2).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--model", required=True, help="mm model directory (mm_config.json + weights)")
    parser.add_argument("--out", required=True, help="directory to write the LLaVA checkpoint to")
    parser.add_argument("--max-shard-size", default="4GB", help="safetensors shard size (default 4GB)")
    args = parser.parse_args(argv)

    from mm.checkpoint import load, read_config
    from mm.errors import MMError, report
    from mm.interop import check_exportable, export_llava

    try:
        check_exportable(read_config(args.model))  # refuse before loading any weights
        out = export_llava(load(args.model), args.out, max_shard_size=args.max_shard_size)
    except MMError as exc:
        return report(exc)
    print(f"wrote LLaVA checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
