"""``mm serve --model DIR``: load a saved model and serve it over HTTP (see docs/serve.md)."""
from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from mm.errors import MMError


def add_serve_command(commands) -> None:
    from mm.cli import add_model_flags

    serve = commands.add_parser("serve", help="OpenAI-compatible chat API (+ web demo with --ui)")
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
    serve.add_argument("--default-max-tokens", type=int, default=256, help="when a request sets no max_tokens")
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s):// image URLs")
    serve.add_argument("--ui", action="store_true", help="serve the web demo at /")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile greedy (temperature 0) decoding before serving: minutes on a CPU, "
                            "faster tokens after (a CUDA graph per step on a GPU)")
    serve.set_defaults(run=run_serve)


def settings_from_args(args: argparse.Namespace):
    from mm.serve.app import ServeSettings

    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-images", args.max_images), ("--default-max-tokens", args.default_max_tokens)):
        if value < 1:
            raise MMError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.port < 65536:
        raise MMError(f"--port must be in 0..65535 (0 = any free port), got {args.port}")
    if args.max_image_mb <= 0 or args.batch_wait_ms < 0:
        raise MMError("--max-image-mb must be > 0 and --batch-wait-ms >= 0")
    return ServeSettings(
        model_name=args.model_name or Path(args.model).resolve().name,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait=args.batch_wait_ms / 1000,
        max_images=args.max_images,
        max_image_bytes=int(args.max_image_mb * 2**20),
        default_max_tokens=args.default_max_tokens,
        allow_remote_images=args.allow_remote_images,
        ui=args.ui,
        compile=args.compile,
    )


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading anything slow, so a taken port is one clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise MMError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from mm.cli import open_model
    from mm.serve.app import create_app

    settings = settings_from_args(args)
    sock = listen(args.host, args.port)
    model = open_model(args)
    model.eval()
    if settings.compile:
        print("mm serve: compiling greedy decoding before serving (minutes on a CPU)...", flush=True)
    app = create_app(model, settings)
    where = f"http://{args.host}:{sock.getsockname()[1]}"
    print(f"mm serve: model {settings.model_name!r} at {where}/v1" + (f", web demo at {where}/" if args.ui else ""),
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0
