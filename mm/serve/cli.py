"""``mm serve --model DIR``: load a saved model and serve it over HTTP (see docs/serve.md); the flags are
defined in ``mm.commands.serve``."""
from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from mm.errors import MMError


def settings_from_args(args: argparse.Namespace):
    from mm.serve.app import ServeSettings
    from mm.serve.remote import parse_allowed

    megapixels, allowed, deadline = args.max_megapixels, tuple(args.allow_remote_address), args.remote_deadline
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-images", args.max_images), ("--default-max-tokens", args.default_max_tokens)):
        if value < 1:
            raise MMError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.port < 65536:
        raise MMError(f"--port must be in 0..65535 (0 = any free port), got {args.port}")
    if args.max_image_mb <= 0 or args.batch_wait_ms < 0:
        raise MMError("--max-image-mb must be > 0 and --batch-wait-ms >= 0")
    if not megapixels > 0 or not deadline > 0:
        raise MMError(f"--max-megapixels and --remote-deadline must be > 0, got {megapixels} and {deadline}")
    for entry in allowed:
        parse_allowed(entry)  # a malformed entry is an MMError naming it
    return ServeSettings(
        model_name=args.model_name or Path(args.model).resolve().name,
        model_path=args.model,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait=args.batch_wait_ms / 1000,
        max_images=args.max_images,
        max_image_bytes=int(args.max_image_mb * 2**20),
        max_pixels=int(megapixels * 1_000_000),
        default_max_tokens=args.default_max_tokens,
        allow_remote_images=args.allow_remote_images,
        allow_remote_addresses=allowed,
        remote_deadline=deadline,
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

    from mm.commands.model_args import open_model
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
