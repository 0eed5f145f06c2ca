"""``mm caption --model DIR IMAGE...``: one caption per image, printed as soon as its batch is ready."""
from __future__ import annotations

import argparse
import json

from mm.commands.model_args import add_model_flags, add_sampling_flags, open_model, sampling
from mm.errors import EXIT_USAGE, MMError, report


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("caption", help="caption images", description=__doc__)
    add_model_flags(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--prompt", default="", help="ask with the chat template instead of plain continuation")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="JSON lines: {image, caption}")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile greedy decoding: the first batch pays about a minute, later ones run "
                             "faster (for many images)")
    add_sampling_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """A bad image is reported and skipped; the exit status is then 2, after the other captions."""
    from mm.images import open_image

    if args.batch_size < 1:
        raise MMError("--batch-size must be at least 1")
    options = sampling(args)
    model = open_model(args)
    failed = 0
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        good, conversations = [], []
        for path in paths:
            try:
                image = open_image(path)
            except MMError as exc:
                report(exc)
                failed += 1
                continue
            good.append(path)
            text = [{"type": "text", "text": args.prompt}] if args.prompt else []
            conversations.append(([{"role": "user", "content": [{"type": "image"}] + text}], [image]))
        if not conversations:
            continue
        captions = model.generate_batch(conversations, chat=bool(args.prompt), compile=args.compile, **options)
        for path, caption in zip(good, captions):
            caption = caption.strip()
            print(json.dumps({"image": path, "caption": caption}) if args.json else f"{path}\t{caption}", flush=True)
    return EXIT_USAGE if failed else 0
