"""The ``mm`` command: caption, vqa and chat with a saved model (serve and eval register here too).

Every user mistake ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from mm.errors import EXIT_USAGE, MMError, report



def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a directory written by model.save / the trainer")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def sampling(args: argparse.Namespace) -> dict:
    if args.max_new_tokens < 1:
        raise MMError("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.num_beams < 1:
        raise MMError("--temperature must be >= 0, --top-p in (0, 1], --num-beams >= 1")
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
    }


def open_model(args: argparse.Namespace):
    import torch

    import mm

    torch.manual_seed(args.seed)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise MMError(f"--device {args.device}: no CUDA device is available")
    return mm.load(args.model, device=args.device, dtype=args.dtype)


def run_caption(args: argparse.Namespace) -> int:
    """One caption per image, printed as soon as it is ready; a bad image is reported and skipped."""
    from mm.images import open_image

    model = open_model(args)
    options = sampling(args)
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
            messages = [{"role": "user", "content": [{"type": "image"}] + ([{"type": "text", "text": args.prompt}] if args.prompt else [])}]
            conversations.append((messages, [image]))
        if not conversations:
            continue
        captions = model.generate_batch(conversations, chat=bool(args.prompt), compile=args.compile, **options)
        for path, caption in zip(good, captions):
            caption = caption.strip()
            print(json.dumps({"image": path, "caption": caption}) if args.json else f"{path}\t{caption}", flush=True)
    return EXIT_USAGE if failed else 0


def run_vqa(args: argparse.Namespace) -> int:
    from mm.images import open_image

    image = open_image(args.image)
    model = open_model(args)
    answer = model.generate(images=[image], prompt=args.question, **sampling(args)).strip()
    print(json.dumps({"image": args.image, "question": args.question, "answer": answer}) if args.json else answer)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat; tokens stream as they are generated. ``/quit`` or EOF ends it."""
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


def add_inference_commands(commands) -> None:
    caption = commands.add_parser("caption", help="caption images")
    add_model_flags(caption)
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    caption.add_argument("--prompt", default="", help="ask with the chat template instead of plain continuation")
    caption.add_argument("--batch-size", type=int, default=4)
    caption.add_argument("--json", action="store_true", help="JSON lines: {image, caption}")
    caption.add_argument("--compile", action="store_true",
                         help="torch.compile greedy decoding: the first batch pays about a minute, later ones run "
                              "faster (for many images)")
    add_sampling_flags(caption)
    caption.set_defaults(run=run_caption)

    vqa = commands.add_parser("vqa", help="answer a question about an image")
    add_model_flags(vqa)
    vqa.add_argument("image", metavar="IMAGE")
    vqa.add_argument("question", metavar="QUESTION")
    vqa.add_argument("--json", action="store_true")
    add_sampling_flags(vqa)
    vqa.set_defaults(run=run_vqa)

    chat = commands.add_parser("chat", help="interactive multi-turn chat, streamed")
    add_model_flags(chat)
    chat.add_argument("--image", default=None)
    add_sampling_flags(chat)
    chat.set_defaults(run=run_chat)


def command_registrars() -> list[Callable]:
    """Each adds its sub-commands to the parser. Listed explicitly: no discovery by folder scanning."""
    registrars = [add_inference_commands]
    for module, name in (("mm.serve.cli", "add_serve_command"), ("mm.evaluate.cli", "add_eval_command")):
        try:
            registrars.append(getattr(__import__(module, fromlist=[name]), name))
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
    return registrars


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mm", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)
    for register in command_registrars():
        register(commands)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except MMError as exc:
        return report(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
