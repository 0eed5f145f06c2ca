"""``mm chat --model DIR [--image IMAGE]``: interactive multi-turn chat, tokens streamed as they are generated."""
from __future__ import annotations

import argparse

from mm.commands.model_args import add_model_flags, add_sampling_flags, open_model, sampling


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="interactive multi-turn chat, streamed", description=__doc__)
    add_model_flags(parser)
    parser.add_argument("--image", default=None)
    add_sampling_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Reads turns from stdin until ``/quit``, ``/exit`` or EOF."""
    import threading

    from transformers import TextIteratorStreamer

    from mm.images import open_image

    images = [open_image(args.image)] if args.image else []
    model = open_model(args)
    options = sampling(args)
    messages: list[dict] = []
    first = True
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if not line.strip():
            continue
        content = ([{"type": "image"}] * len(images) if first else []) + [{"type": "text", "text": line}]
        first = False
        messages.append({"role": "user", "content": content})
        streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def work():
            try:
                result["text"] = model.generate(images=images, messages=messages, streamer=streamer, **options)
            except BaseException as exc:  # surfaced below, on the main thread
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        print("mm> ", end="", flush=True)
        for piece in streamer:
            print(piece, end="", flush=True)
        thread.join()
        print(flush=True)
        if "error" in result:
            raise result["error"]
        messages.append({"role": "assistant", "content": [{"type": "text", "text": result["text"].strip()}]})
