"""``mm chat --model DIR [--image IMAGE ...]``: interactive multi-turn chat, the answers streamed as they are written.

Commands: ``/image PATH [PATH ...]`` attaches images to your next message (repeat it for more), ``/reset`` starts
a new conversation, ``/save FILE`` writes the transcript as JSON, ``/help``, ``/quit`` (or ``/exit``). Line editing
and history come from readline (history in ``~/.cache/mm/chat_history``). Ctrl-C stops the answer being written and
keeps the session; at the prompt it clears the line. Ctrl-D (end of input) ends. A mistake in one turn (a typed
``<image>`` or special token, an unreadable image, a message the model cannot take) is one ``mm: error: ...`` line;
the session goes on.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
from pathlib import Path

from mm.commands.model_args import add_model_flags, add_sampling_flags, open_model, sampling
from mm.errors import MMError, report

HOW_TO_ATTACH = ("images are not typed as {token}: attach one with '/image PATH' (it goes with your next message) "
                 "or start with 'mm chat --image PATH'")
HELP = """commands:
  /image PATH [PATH ...]  attach images to your next message (several are fine; /image alone lists them)
  /reset                  start a new conversation (history and images forgotten)
  /save FILE              write the conversation to FILE as JSON
  /help                   this list
  /quit                   end (or Ctrl-D)
Ctrl-C stops the answer being written; the conversation keeps what was shown."""
HISTORY = Path.home() / ".cache" / "mm" / "chat_history"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="interactive multi-turn chat, streamed", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--image", action="append", default=[], help="an image for your first message (repeatable)")
    add_sampling_flags(parser)
    parser.set_defaults(run=run)


def special_tokens(tokenizer) -> list[str]:
    """Strings a typed message may not contain: ``<image>`` and the tokenizer's special tokens (they would forge
    image slots or turns)."""
    from mm.prompt import IMAGE_TOKEN

    added = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return sorted({IMAGE_TOKEN, *tokenizer.all_special_tokens, *added} - {""}, key=len, reverse=True)


def _readline() -> None:
    """Line editing + persistent history when a person types (stdin is a terminal)."""
    if not sys.stdin.isatty():
        return
    try:
        import atexit
        import readline
    except ImportError:  # pragma: no cover - Python built without readline
        return
    readline.set_history_length(1000)
    try:
        readline.read_history_file(HISTORY)
    except OSError:
        pass

    def save() -> None:
        try:
            HISTORY.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(HISTORY)
        except OSError:
            pass

    atexit.register(save)


class Chat:
    """The conversation: ``messages`` (what the model sees), its images in order of appearance, their paths, and
    the images waiting for the next message."""

    def __init__(self, model, options: dict, model_dir: str):
        self.model, self.options, self.model_dir = model, options, model_dir
        self.reserved = special_tokens(model.tokenizer)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.images: list = []  # PIL images of the whole conversation, in the order of its image parts
        self.paths: list[str] = []
        self.pending: list[tuple[str, object]] = []  # (path, image) for the next message

    def banner(self) -> str:
        config = self.model.config
        parts = " + ".join(str(p.name) for p in (config.encoder, config.adapter, config.llm))
        return (f"mm chat: {Path(self.model_dir).resolve().name} ({parts}, {self.model.tokens_per_image} tokens per "
                f"image)\nAttach images with /image PATH (they go with your next message); /help lists the commands; "
                f"Ctrl-C stops an answer, Ctrl-D quits.")

    # ----- commands ---------------------------------------------------------------------------------------
    def attach(self, paths: list[str]) -> None:
        """Decode ``paths`` now for the next message; MMError naming the first that cannot be read (the ones
        before it stay attached)."""
        for path in paths:
            self.pending += read_images([path])
            print(f"attached {path} ({len(self.pending)} image{'s' * (len(self.pending) > 1)} for your next message)")

    def save(self, path: str) -> None:
        paths = iter(self.paths)
        messages = [{"role": m["role"], "content": [
            {"type": "image", "image": next(paths)} if part["type"] == "image" else part for part in m["content"]]}
            for m in self.messages]
        transcript = {"model": str(Path(self.model_dir).resolve()), "options": self.options, "messages": messages}
        try:
            Path(path).expanduser().write_text(json.dumps(transcript, indent=1, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise MMError(f"cannot save to {path}: {exc.strerror or exc}") from None
        print(f"saved {len(messages)} messages to {path}")

    def command(self, line: str) -> bool:
        """Run a ``/command``; False means quit."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise MMError(f"cannot read the command: {exc}") from None
        name, args = words[0], words[1:]
        if name in ("/quit", "/exit"):
            return False
        if name == "/image":
            if args:
                self.attach(args)
            else:
                print("attached: " + (", ".join(p for p, _ in self.pending) or "none") + " (/image PATH adds one)")
        elif name == "/reset":
            self.reset()
            print("new conversation")
        elif name == "/save":
            if len(args) != 1:
                raise MMError("/save needs a file name: /save FILE")
            self.save(args[0])
        elif name == "/help":
            print(HELP)
        else:
            raise MMError(f"unknown command {name}; /help lists them")
        return True

    # ----- one turn ---------------------------------------------------------------------------------------
    def ask(self, text: str) -> None:
        """Answer ``text`` (with the pending images), streaming; MMError (the turn dropped, its images still
        pending) when the model cannot take it."""
        from mm.prompt import IMAGE_TOKEN

        found = next((token for token in self.reserved if token in text), None)
        if found is not None:
            raise MMError(HOW_TO_ATTACH.format(token=IMAGE_TOKEN) if found == IMAGE_TOKEN else
                          f"messages may not contain the model's special token {found!r}")
        content = [{"type": "image"}] * len(self.pending) + [{"type": "text", "text": text}]
        messages = self.messages + [{"role": "user", "content": content}]
        images = self.images + [image for _, image in self.pending]
        answer = _stream(self.model, images, messages, self.options)
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]}]
        self.images = images
        self.paths += [path for path, _ in self.pending]
        self.pending = []


def read_images(paths: list[str]) -> list[tuple[str, object]]:
    """``(absolute path, decoded image)`` per path; MMError naming a file that cannot be read."""
    from mm.images import open_image

    return [(str(Path(p).expanduser().resolve()), open_image(Path(p).expanduser(), name=p)) for p in paths]


def _stream(model, images: list, messages: list[dict], options: dict) -> str:
    """Generate the reply, printing its text as it comes; Ctrl-C stops it there. Returns the text shown."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = threading.Event()

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}

    def work():
        try:
            result["text"] = model.generate(images=images, messages=messages, streamer=streamer,
                                            stopping_criteria=StoppingCriteriaList([Stop()]), **options)
        except BaseException as exc:  # surfaced below, on the main thread
            result["error"] = exc
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    shown = ""
    try:
        print("mm> ", end="", flush=True)
        for piece in streamer:
            shown += piece
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        for _ in streamer:  # generation reaches the stop at its next token and ends the stream
            pass
        print(" [stopped]", end="")
    thread.join()
    print(flush=True)
    if "error" in result:
        raise result["error"]
    return shown if stop.is_set() else result["text"]


def run(args: argparse.Namespace) -> int:
    """Reads turns from stdin until ``/quit``, ``/exit`` or end of input."""
    options = sampling(args)
    # Ctrl-C stops an answer: take SIGINT even when the parent started us with it ignored (nohup, some launchers
    # and test runners), which Python would otherwise keep
    signal.signal(signal.SIGINT, signal.default_int_handler)
    first = read_images(args.image)  # a bad --image ends the command before the model loads
    model = open_model(args)
    chat = Chat(model, options, args.model)
    print(chat.banner(), flush=True)
    chat.pending = first
    if first:
        print(f"attached {', '.join(args.image)} to your first message")
    _readline()
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # clears the line, as a shell does
            print()
            continue
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("/"):
                if not chat.command(text):
                    return 0
            else:
                chat.ask(text)
        except MMError as exc:
            report(exc)
        except KeyboardInterrupt:  # Ctrl-C between the stream's end and the bookkeeping: the session goes on
            print()
