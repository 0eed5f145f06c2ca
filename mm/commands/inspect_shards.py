"""``mm inspect``: summarise shards: counts by kind and language, images per doc, token lengths, bad samples.

    mm inspect DIR_OR_GLOB [--model MODEL_DIR | --tokenizer HF_DIR --tokens-per-image N] [--json]

Token lengths use the model's tokenizer and adapter token count (``--model``, an mm checkpoint), a transformers
tokenizer directory (``--tokenizer``), or by default the tiny test tokenizer with 64 tokens per image.
"""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="summarise shards (kinds, languages, token lengths, bad samples)",
                                   description=__doc__)
    parser.add_argument("shards", help="shard directory, glob or file")
    parser.add_argument("--model", help="mm checkpoint directory (its tokenizer and tokens per image)")
    parser.add_argument("--tokenizer", help="transformers tokenizer directory")
    parser.add_argument("--tokens-per-image", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.set_defaults(run=run)


def renderer_for(args: argparse.Namespace):
    """The Renderer that counts tokens: from ``--model``, ``--tokenizer`` or the tiny test tokenizer."""
    from mm.data.render import Renderer
    from mm.prompt import add_image_token

    if args.model:
        import mm

        return Renderer.from_model(mm.load(args.model), 1 << 30)
    if args.tokenizer:
        from mm.llm.base import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)  # no code from the directory; one line when unreadable
    else:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        from mm.llm.tiny import tiny_tokenizer

        base = tiny_tokenizer()  # copied: adding <image> must not touch the cached one
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()),
                                            eos_token=base.eos_token, pad_token=base.pad_token)
        tokenizer.chat_template = base.chat_template
    return Renderer(tokenizer, add_image_token(tokenizer), args.tokens_per_image, None, 1 << 30)


def run(args: argparse.Namespace) -> int:
    from mm.data.inspect import inspect_shards
    from mm.errors import MMError

    if args.tokens_per_image < 1:
        raise MMError(f"--tokens-per-image must be at least 1, got {args.tokens_per_image}")

    summary = inspect_shards(args.shards, renderer_for(args))
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{summary['shards']} shards, {summary['documents']} documents")
    for title in ("kinds", "languages", "images_per_doc"):
        print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in summary[title].items()))
    tokens = summary["tokens"]
    print(f"tokens per row: min {tokens['min']}, mean {tokens['mean']}, max {tokens['max']}")
    top = max(tokens["histogram"].values(), default=0) or 1
    for band, count in tokens["histogram"].items():
        print(f"  {band:>10} {count:7d} {'#' * round(40 * count / top)}")
    print("bad samples: " + (", ".join(f"{k}={v}" for k, v in summary["bad"].items()) or "none"))
    for reason, example in summary["bad_examples"].items():
        print(f"  {reason}: {example}")
    return 0
