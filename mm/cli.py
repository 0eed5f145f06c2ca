"""The ``mm`` command: run, serve, evaluate and train multimodal models, and the data and export tools.

Each subcommand is one module of ``mm.commands``, listed in COMMANDS (no discovery). Every user mistake ends with
one ``mm: error: ...`` line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata

from mm.commands import (
    caption,
    chat,
    convert,
    evaluate,
    export_hf,
    import_hf,
    inspect_shards,
    make_synthetic,
    plot,
    precompute_ref,
    serve,
    train,
    vqa,
)
from mm.commands.model_args import add_model_flags, open_model  # noqa: F401  (used by mm.serve.cli, mm.evaluate.cli)
from mm.commands.parser import Parser
from mm.errors import MMError, report

DISTRIBUTION = "mm-vlm"  # the name on PyPI (pip install mm-vlm); the import package and the command are `mm`


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0+unknown"


COMMANDS = (caption, vqa, chat, serve, evaluate, train, convert, inspect_shards, make_synthetic, precompute_ref,
            export_hf, import_hf, plot)


def parser() -> Parser:
    root = Parser(prog="mm", description="Run, serve, evaluate and train multimodal LLMs; convert, inspect and export "
                                          "their data and models.")
    root.add_argument("--version", action="version", version=f"mm {version()}")
    subparsers = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return root


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns its exit status. Bad flags and
    ``--help`` end in SystemExit (2 and 0), as argparse does.

    transformers' warnings are off unless ``TRANSFORMERS_VERBOSITY`` says otherwise: stderr is for mm's own
    lines. A reader that closes the pipe early (``mm caption ... | head -1``) ends the command quietly; an
    operating-system error (a full disk, an unwritable path) is one ``mm: error: ...`` line like any mistake."""
    args = parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.run(args)
    except MMError as exc:
        return report(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _drop_stdout()  # the reader is gone: nothing left to say, to anyone
        return 1  # what Python itself exits with on EPIPE
    except OSError as exc:  # the system said no: a full disk, an unwritable path, a closed stream
        try:
            if sys.stdout is not None:
                sys.stdout.flush()
        except OSError:
            _drop_stdout()
        where = f": {exc.filename}" if exc.filename else ""
        return report(MMError(f"{exc.strerror or exc}{where}"))


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still buffered cannot fail."""
    if sys.stdout is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
