"""Helpers for the serve tests: real servers on 127.0.0.1 (a free port) in a uvicorn thread, serving a tiny model saved to disk."""
from __future__ import annotations

import base64
import contextlib
import io
import threading
import time

import uvicorn
from PIL import Image

import mm
from mm.serve import ServeSettings, create_app
from mm.serve.cli import listen

MODEL = "tiny"


@contextlib.contextmanager
def serving(model_dir, **settings):
    """Yield the base URL of a running server; stop it (and its engine thread) afterwards."""
    model = mm.load(model_dir)
    model.eval()
    app = create_app(model, ServeSettings(model_name=MODEL, **settings))
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def image_bytes(color="red", size=(40, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def image_message(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
            + [{"type": "text", "text": text}]}


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
