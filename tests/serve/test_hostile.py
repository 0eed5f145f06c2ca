"""Hostile requests: bodies, texts and images sized to exhaust the server's memory, and remote image URLs aimed at
the server's own network. Each is refused early with an OpenAI-style error; the server keeps serving."""
from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time
import urllib.parse

import httpx
import pytest

import mm
import mm.serve.images
from mm.errors import MMError
from mm.serve.remote import RemotePolicy, is_public, parse_allowed

from serve_helpers import MODEL, data_url, image_bytes, image_message, serving

MAX_IMAGE_BYTES = 30_000


def post(url, body, timeout=60):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def chat(*messages, **extra):
    return {"model": MODEL, "messages": list(messages), "max_tokens": 2, "temperature": 0, **extra}


def error_of(response, status, code):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    return error["message"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serving(tiny_model_dir, max_images=4, max_image_bytes=MAX_IMAGE_BYTES, max_pixels=3_000_000) as url:
        yield url


@pytest.fixture()
def count_calls(monkeypatch):
    """Patch ``owner.name`` with a wrapper that counts its calls; returns the list of calls."""

    def patch(owner, name):
        calls, original = [], getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return patch


# ----- memory: body, text, pixels --------------------------------------------------------------------------------
def send_endless_chunked_body(base_url: str, cap: int = 256 * 2**20) -> tuple[bytes, int]:
    """POST a chunked body that never ends (up to ``cap`` bytes); return the answer and the bytes sent before the
    server closed the connection."""
    host, port = base_url.removeprefix("http://").split(":")
    piece = b"x" * 65536
    frame = b"%x\r\n%s\r\n" % (len(piece), piece)
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < cap:
                sock.sendall(frame)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection
        try:
            while data := sock.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
    return answer, sent


def test_chunked_body_over_the_limit_is_cut_off(server):
    answer, sent = send_endless_chunked_body(server)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"request_too_large" in body, answer[:300]
    assert sent < 64 * 2**20, f"the server read {sent} bytes of a body over its ~1 MB limit"
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_huge_text_is_refused_before_tokenising(server, count_calls):
    tokenized = count_calls(mm.MultimodalModel, "tokenize")
    message = error_of(post(server, chat({"role": "user", "content": "word " * 200_000})), 400,
                       "context_length_exceeded")
    assert "1000000 characters" in message and tokenized == []
    assert post(server, chat({"role": "user", "content": "hi"})).status_code == 200 and tokenized  # the guard


def square_png(side: int) -> bytes:
    raw = image_bytes("gray", (side, side))
    assert len(raw) < MAX_IMAGE_BYTES  # flat colour: tiny file, many pixels
    return raw


def test_images_over_the_pixel_budget_are_refused_before_decoding(server, count_calls):
    decoded = count_calls(mm.serve.images, "open_image")
    big = data_url(square_png(1500))  # 2.25 megapixels each; the budget is 3
    message = error_of(post(server, chat(image_message("?", big, big))), 413, "too_many_pixels")
    assert "4.5 megapixels" in message and decoded == []
    assert post(server, chat(image_message("?", big))).status_code == 200 and len(decoded) == 1


def test_decoded_images_are_kept_small():
    tall = image_bytes("blue", (100, 5000))
    (image,) = mm.serve.images.decode([tall], max_pixels=10**7, keep_side=2048)
    assert image.size == (41, 2048) and image.mode == "RGB"  # aspect kept
    small = image_bytes("blue", (300, 200))
    assert mm.serve.images.decode([small], max_pixels=10**7, keep_side=2048)[0].size == (300, 200)


def test_near_zero_temperature_is_greedy_not_an_error(server):
    ask = {"role": "user", "content": "hello"}
    tiny = post(server, chat(ask, temperature=1e-300, max_tokens=4))
    greedy = post(server, chat(ask, temperature=0, max_tokens=4))
    assert tiny.status_code == greedy.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


# ----- remote images ---------------------------------------------------------------------------------------------
class Site(http.server.ThreadingHTTPServer):
    """A local image site that records its requests: /red.png, /to?url=U (302), /drip (slow), /big."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), SiteHandler)
        self.hits: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class SiteHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hits.append(self.path)
        path, _, query = self.path.partition("?")
        if path == "/red.png":
            self.answer(200, image_bytes("red"))
        elif path == "/to":
            self.send_response(302)
            self.send_header("Location", urllib.parse.parse_qs(query)["url"][0])
            self.end_headers()
        elif path == "/drip":  # one byte every 0.2 s of a declared 1000
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif path == "/big":  # no Content-Length: the limit must hold while reading
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * (2 * MAX_IMAGE_BYTES))
        else:
            self.answer(404, b"")

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def sites():
    """An allowed site and an 'internal' one (another loopback port) that must never be reached."""
    allowed, internal = Site(), Site()
    yield allowed, internal
    for site in (allowed, internal):
        site.shutdown()


@pytest.fixture(scope="module")
def remote_server(tiny_model_dir, sites):
    allowed, _ = sites
    with serving(tiny_model_dir, allow_remote_images=True, max_image_bytes=MAX_IMAGE_BYTES, remote_deadline=1.0,
                 allow_remote_addresses=(allowed.url.removeprefix("http://"),)) as url:
        yield url


def ask_for(server, image_url):
    return post(server, chat(image_message("what?", image_url)))


def test_allowed_address_serves_images_and_redirects_within_it(remote_server, sites):
    allowed, _ = sites
    assert ask_for(remote_server, allowed.url + "/red.png").status_code == 200
    hop = allowed.url + "/to?url=" + urllib.parse.quote(allowed.url + "/red.png")
    assert ask_for(remote_server, hop).status_code == 200


def test_redirect_to_a_private_address_is_refused(remote_server, sites):
    allowed, internal = sites
    internal.hits.clear()
    messages = set()
    for target in (internal.url + "/red.png", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png"):
        hop = allowed.url + "/to?url=" + urllib.parse.quote(target)
        messages.add(error_of(ask_for(remote_server, hop), 400, "image_fetch_failed"))
    assert internal.hits == []
    (message,) = messages  # one message whatever the target: nothing about internal hosts
    for secret in ("127.0.0.1", "169.254", "10.0.0.1", str(internal.server_address[1]), "redirect"):
        assert secret not in message


def test_private_addresses_are_refused_without_a_connection(remote_server, sites):
    _, internal = sites
    internal.hits.clear()
    port = internal.server_address[1]
    hosts = ("127.0.0.1", "localhost", "127.1", "2130706433", "0.0.0.0", "[::ffff:127.0.0.1]", "[::1]")
    messages = {error_of(ask_for(remote_server, f"http://{host}:{port}/red.png"), 400, "image_fetch_failed")
                for host in hosts}
    assert internal.hits == [] and len(messages) == 1
    assert error_of(ask_for(remote_server, f"ftp://127.0.0.1:{port}/red.png"), 400, "invalid_image_url")


def test_slow_remote_image_is_cut_at_the_deadline(remote_server, sites):
    allowed, _ = sites
    start = time.monotonic()
    error_of(ask_for(remote_server, allowed.url + "/drip"), 400, "image_fetch_failed")
    assert time.monotonic() - start < 10  # the deadline is 1 s; the drip takes 200 s


def test_remote_image_over_the_size_limit_is_refused(remote_server, sites):
    allowed, _ = sites
    error_of(ask_for(remote_server, allowed.url + "/big"), 400, "image_too_large")


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("255.255.255.255", False), ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True), ("2002:7f00:1::", False), ("64:ff9b::a00:1", False),
])
def test_address_policy(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


def test_allow_list_names_address_and_port():
    policy = RemotePolicy(allow=("127.0.0.1:8080", "10.1.0.0/16", "[::1]:9000"))
    loopback = ipaddress.ip_address("127.0.0.1")
    assert policy.permits(loopback, 8080) and not policy.permits(loopback, 8081)
    inside, outside = ipaddress.ip_address("10.1.200.3"), ipaddress.ip_address("10.2.0.1")
    assert policy.permits(inside, 1) and not policy.permits(outside, 1)
    assert policy.permits(ipaddress.ip_address("::1"), 9000) and not policy.permits(ipaddress.ip_address("::1"), 80)
    for bad in ("localhost:80", "127.0.0.1:0", "1.2.3.4:http", ""):
        with pytest.raises(MMError, match="--allow-remote-address"):
            parse_allowed(bad)


def test_internal_errors_do_not_leak_details(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail: /srv/models/private")

    monkeypatch.setattr(mm.MultimodalModel, "tokenize", broken)
    response = post(server, chat({"role": "user", "content": "hi"}))
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert "secret" not in response.text and "RuntimeError" not in response.text
