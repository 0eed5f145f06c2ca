"""``mm serve --model DIR``: load a saved model and serve it over HTTP (see docs/serve.md).

The flags are defined here, not in ``mm.serve.cli``: importing the ``mm.serve`` package loads torch and fastapi,
and building the ``mm`` parser must stay light.
"""
from __future__ import annotations

import argparse
import math
import os

from mm.commands.model_args import add_model_flags
from mm.errors import MMError


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="OpenAI-compatible chat API (+ web demo with --ui)",
                                  description=__doc__)
    add_model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("MM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/* (default: $MM_API_KEY)")
    serve.add_argument("--model-name", default=None, help="the id clients send as 'model' (default: DIR's name)")
    serve.add_argument("--max-batch", type=int, default=8, help="rows (requests x n) generated together")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get HTTP 429")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait this long to fill a batch")
    serve.add_argument("--max-images", type=int, default=4, help="images per request")
    serve.add_argument("--max-image-mb", type=float, default=20.0, help="encoded size limit per image")
    serve.add_argument("--max-megapixels", type=float, default=64.0,
                       help="decoded pixels of all of a request's images together; more get HTTP 413")
    serve.add_argument("--default-max-tokens", type=int, default=256, help="when a request sets no max_tokens")
    serve.add_argument("--allow-remote-images", action="store_true",
                       help="fetch http(s):// image URLs on public addresses")
    serve.add_argument("--allow-remote-address", action="append", default=[], metavar="ADDR[:PORT]",
                       help="with --allow-remote-images, also fetch from this loopback/private address or network "
                            "(repeatable), e.g. 10.1.2.3:8080 or 10.1.0.0/16")
    serve.add_argument("--remote-deadline", type=float, default=10.0,
                       help="seconds to fetch one remote image, redirects included")
    serve.add_argument("--ui", action="store_true", help="serve the web demo at /")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile greedy (temperature 0) decoding before serving: minutes on a CPU, "
                            "faster tokens after (a CUDA graph per step on a GPU)")
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mm.serve.cli import run_serve

    for flag in ("max_image_mb", "batch_wait_ms", "max_megapixels", "remote_deadline"):
        value = getattr(args, flag)
        if not math.isfinite(value):  # NaN passes every range check after this
            raise MMError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")

    return run_serve(args)
