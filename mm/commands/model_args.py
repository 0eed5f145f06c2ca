"""What the commands that run a saved model share: the model and sampling flags, and opening the model."""
from __future__ import annotations

import argparse
import math

from mm.errors import MMError


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
    """The ``generate`` keyword arguments of the sampling flags; MMError when one is out of range."""
    if args.max_new_tokens < 1:
        raise MMError("--max-new-tokens must be at least 1")
    if not 0 <= args.temperature < math.inf or not 0 < args.top_p <= 1 or args.num_beams < 1:  # NaN fails too
        raise MMError("--temperature must be >= 0 and finite, --top-p in (0, 1], --num-beams >= 1")
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
    }


def device(name: str):
    """``--device`` as a ``torch.device`` that exists here: cpu, cuda[:N] or mps; MMError otherwise."""
    import torch

    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise MMError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise MMError(f"--device {name}: no CUDA device is available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise MMError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise MMError(f"--device {name}: MPS is not available")
    elif parsed.type != "cpu" or parsed.index not in (None, 0):
        raise MMError(f"--device {name!r}: mm runs models on cpu, cuda, cuda:N or mps")
    return parsed


def open_model(args: argparse.Namespace):
    """``mm.load`` of ``--model`` on ``--device`` in ``--dtype``, after seeding torch with ``--seed``."""
    import torch

    import mm

    target = device(args.device)
    try:
        torch.manual_seed(args.seed)
    except (RuntimeError, ValueError):
        raise MMError(f"--seed {args.seed} is out of range (0 to 2**64 - 1)") from None
    return mm.load(args.model, device=target, dtype=args.dtype)
