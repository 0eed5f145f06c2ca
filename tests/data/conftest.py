"""Data-test fixtures: a local HTTP server on 127.0.0.1 (the tiny model comes from tests/conftest.py)."""
from __future__ import annotations

import http.server
import threading

import pytest


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    hits: dict = {}

    def do_GET(self):  # noqa: N802
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        status, body = self.routes.get(self.path, (404, b"not found"))
        if callable(body):
            status, body = body(self.hits[self.path])
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1; set ``server.routes[path] = (status, bytes | fn(hit) -> (status, bytes))``."""
    handler = type("Handler", (_Handler,), {"routes": {}, "hits": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.routes, server.hits = handler.routes, handler.hits
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()
