"""``mm vqa --model DIR IMAGE QUESTION``: answer one question about one image."""
from __future__ import annotations

import argparse
import json

from mm.commands.model_args import add_model_flags, add_sampling_flags, open_model, sampling


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("vqa", help="answer a question about an image", description=__doc__)
    add_model_flags(parser)
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("question", metavar="QUESTION")
    parser.add_argument("--json", action="store_true")
    add_sampling_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mm.images import open_image

    image = open_image(args.image)
    options = sampling(args)
    model = open_model(args)
    answer = model.generate(images=[image], prompt=args.question, **options).strip()
    print(json.dumps({"image": args.image, "question": args.question, "answer": answer}) if args.json else answer)
    return 0
