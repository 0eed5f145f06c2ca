"""``mm export-hf``: export an mm model directory to a transformers LLaVA (or LLaVA-NeXT) directory.

    mm export-hf --model runs/sft/final --out llava-hf-dir

The layout decides the target: ``fixed`` -> ``LlavaForConditionalGeneration``, ``anyres`` (arrangement
``llava_next``) -> ``LlavaNextForConditionalGeneration``. The result loads with ``from_pretrained`` and
``AutoProcessor.from_pretrained`` and gives mm's logits and greedy generations. Exportable: an ``hf:`` CLIP/SigLIP
vision tower, a ``linear`` or ``mlp`` adapter, no modality experts; anything else is refused with a message naming
the part (exit 2).
"""
from __future__ import annotations

import argparse
import re

SIZE = re.compile(r"(?i)(?=[\d.]*[1-9])\d+(\.\d+)?\s*[KMGT]B")  # what huggingface_hub's shard splitter reads


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export-hf", help="export an mm model to a transformers LLaVA / LLaVA-NeXT "
                                                     "directory",
                                   description=__doc__)
    parser.add_argument("--model", required=True, help="mm model directory (mm_config.json + weights)")
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--max-shard-size", default="4GB", help="safetensors shard size (default 4GB)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import mm
    from mm.checkpoint import read_config
    from mm.errors import MMError
    from mm.interop import check_exportable, export_llava, export_llava_next, export_target
    from mm.train.preflight import writable_dir

    if not SIZE.fullmatch(args.max_shard_size.strip()):
        raise MMError(f"--max-shard-size {args.max_shard_size!r} is not a size (a positive number and KB, MB, GB "
                      "or TB, e.g. 4GB)")
    config = read_config(args.model)
    check_exportable(config)  # refuse before loading any weights
    writable_dir(args.out, "--out", keep=False)
    target = export_target(config)
    export, name = {"llava": (export_llava, "LLaVA"), "llava_next": (export_llava_next, "LLaVA-NeXT")}[target]
    out = export(mm.load(args.model), args.out, max_shard_size=args.max_shard_size)
    print(f"wrote {name} checkpoint to {out}")
    return 0
