"""``mm vqa --model DIR {IMAGE | --image PATH ...} QUESTION``: answer a question about one image or several.

    mm vqa --model DIR photo.jpg "what is on the table?"
    mm vqa --model DIR --image before.jpg --image after.jpg "what changed?"
    mm vqa --model DIR --image a.png --image b.png "is <image> the same scene as <image>?"

The images go before the question, in the order given, unless the question places them with one ``<image>``
marker per image. Images come either as the one positional IMAGE or as ``--image PATH`` (repeatable), not both.
Every image is read before the model loads: a bad one ends the command with one ``mm: error: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import json

from mm.commands.model_args import add_model_flags, add_sampling_flags, open_model, sampling
from mm.errors import MMError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("vqa", help="answer a question about one or more images", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--image", action="append", default=[], metavar="PATH", dest="images",
                        help="an image, before the question in the order given (repeatable; replaces IMAGE)")
    parser.add_argument("image", metavar="IMAGE", nargs="?", help="the image (or give --image PATH instead)")
    parser.add_argument("question", metavar="QUESTION", help="<image> markers place the images in it")
    parser.add_argument("--json", action="store_true", help="one JSON object: {images, image, question, answer}")
    add_sampling_flags(parser)
    parser.intermixed = True  # `mm vqa a.png --json "q"`: a flag between IMAGE and QUESTION
    parser.set_defaults(run=run)


def image_paths(args: argparse.Namespace) -> list[str]:
    """The images in order: the positional IMAGE or the ``--image`` flags; MMError for none or both."""
    if args.image is not None and args.images:
        raise MMError("give the images either as IMAGE or as --image PATH (repeatable), not both")
    paths = [args.image] if args.image is not None else list(args.images)
    if not paths:
        raise MMError("no image: use 'mm vqa --model DIR IMAGE QUESTION' or '--image PATH ... QUESTION'")
    return paths


def run(args: argparse.Namespace) -> int:
    from mm.images import open_image
    from mm.prompt import user_message

    paths = image_paths(args)
    images = [open_image(path) for path in paths]  # every image read before the model loads
    user_message(args.question, len(images))  # <image> markers that do not match the images: before loading too
    options = sampling(args)
    model = open_model(args)
    answer = model.generate(images=images, prompt=args.question, **options).strip()
    if args.json:
        print(json.dumps({"images": paths, "image": paths[0], "question": args.question, "answer": answer}))
    else:
        print(answer)
    return 0
