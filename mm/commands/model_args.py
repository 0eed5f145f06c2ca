"""What the commands that run a saved model share: the model and sampling flags, and opening the model."""
from __future__ import annotations

import argparse

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
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.num_beams < 1:
        raise MMError("--temperature must be >= 0, --top-p in (0, 1], --num-beams >= 1")
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
    }


def open_model(args: argparse.Namespace):
    """``mm.load`` of ``--model`` on ``--device`` in ``--dtype``, after seeding torch with ``--seed``."""
    import torch

    import mm

    torch.manual_seed(args.seed)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise MMError(f"--device {args.device}: no CUDA device is available")
    return mm.load(args.model, device=args.device, dtype=args.dtype)
