"""Data from strangers (docs/security.md): converters read images only from under their root and only when they
decode; the downloader fetches only http(s), never reaches a non-public address unless allowed (checked after DNS
and on every redirect hop), verifies every row's own sha512 and gives up at a total deadline. Real files, real
local HTTP servers, no mocks."""
from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm.data import iter_docs
from mm.data.convert import caption_docs, llava_docs, preference_docs, read_table, write_all
from mm.data.download import FetchError, Fetcher
from mm.data.moscar import Mirror, convert_moscar
from mm.errors import MMError

from data_helpers import png


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        route = self.server.routes.get(self.path)
        if route is None:
            _reply(self, 404, b"not found")
            return
        try:
            route(self)
        except OSError:  # the client hung up (as a deadline does)
            pass

    def log_message(self, *args):
        pass


def _reply(handler, status: int, body: bytes = b"", headers: dict | None = None) -> None:
    handler.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def serve():
    """``serve()`` starts one more real HTTP server on 127.0.0.1 with ``routes[path] = fn(handler)`` and ``hits``."""
    started = []

    def start():
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.routes, server.hits = {}, {}
        server.port = server.server_address[1]
        server.base = f"http://127.0.0.1:{server.port}"
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def _only(server) -> Fetcher:
    """A fetcher that may reach exactly this local server (loopback is refused by default)."""
    return Fetcher(timeout=2, retries=0, workers=4, allow_addresses=(f"127.0.0.1:{server.port}",))


def _image(server, path: str, data: bytes) -> str:
    server.routes[path] = lambda h: _reply(h, 200, data)
    return server.base + path


# ----- converters: local image paths ------------------------------------------------------------------------
def test_llava_refuses_absolute_dotdot_and_symlinked_paths_out_of_images(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    good, secret = png((1, 2, 3)), png((6, 6, 6))  # the secret is a real image: only containment can refuse it
    (root / "a.png").write_bytes(good)
    (outside / "secret.png").write_bytes(secret)
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "linked_dir")
    os.symlink(root / "a.png", root / "alias.png")  # a symlink that stays inside is fine
    names = ["a.png", "sub/../a.png", "alias.png",  # kept
             str(outside / "secret.png"), "../outside/secret.png", "sub/../../outside/secret.png", "link.png",
             "linked_dir/secret.png"]
    records = [{"id": str(i), "image": name, "conversations": [{"from": "human", "value": "<image> what?"},
                                                                {"from": "gpt", "value": "x"}]}
               for i, name in enumerate(names)]
    stats = write_all(llava_docs(records, root), tmp_path / "out", "llava", 100, 1 << 30, progress=False)
    assert stats["written"] == 3
    assert stats["dropped"] == {"absolute_image_path": 1, "image_outside_root": 4}
    assert [imgs for _, _, imgs in iter_docs(tmp_path / "out")] == [[good]] * 3


def test_text_file_named_jpg_is_refused_not_copied_into_shards(tmp_path):
    (tmp_path / "passwd.jpg").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "caps.csv").write_text("image,caption\npasswd.jpg,a\nempty.png,b\nok.png,c\n/etc/passwd,d\n")
    table = read_table(tmp_path / "caps.csv")
    stats = write_all(caption_docs(table, tmp_path, None), tmp_path / "out", "cap", 100, 1 << 30, progress=False)
    assert stats["written"] == 1
    assert stats["dropped"] == {"undecodable_image": 2, "absolute_image_path": 1}
    (_, _, imgs), = iter_docs(tmp_path / "out")
    assert imgs == [png()]


def test_preference_refuses_dotdot_out_of_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "q.png").write_bytes(png())
    (tmp_path / "above.png").write_bytes(png())
    rows = [{"image": "q.png", "question": "?", "chosen": "a", "rejected": "b"},
            {"image": "../above.png", "question": "?", "chosen": "a", "rejected": "b"},
            {"image": ["q.png", 7], "question": "?", "chosen": "a", "rejected": "b"}]
    stats = write_all(preference_docs(rows, tmp_path / "images"), tmp_path / "out", "p", 100, 1 << 30,
                      progress=False)
    assert stats["written"] == 1 and stats["dropped"] == {"image_outside_root": 1, "malformed_entry": 1}


# ----- downloader: schemes and addresses --------------------------------------------------------------------
def test_download_refuses_loopback_by_default_without_connecting(serve):
    server = serve()
    url = _image(server, "/x.png", png())
    error, = Fetcher(retries=0).fetch_all([(url, None)])
    assert isinstance(error, FetchError) and str(error) == f"private_address: {url}"
    assert server.hits == {}  # refused before any connection
    assert Fetcher(retries=0, allow_private=True).fetch_all([(url, None)]) == [png()]  # the flag relaxes it
    assert _only(server).fetch_all([(url, None)]) == [png()]  # so does allowing this one address:port


def test_download_fetches_only_http_and_https(tmp_path):
    (tmp_path / "x.png").write_bytes(png())
    urls = [f"file://{tmp_path / 'x.png'}", "ftp://127.0.0.1/x.png", "data:image/png;base64,AAAA", "x.png", None]
    results = Fetcher(retries=0, allow_private=True).fetch_all([(u, None) for u in urls])
    assert [r.reason for r in results] == ["unsupported_scheme"] * 4 + ["bad_url"]


def test_redirect_to_private_address_is_refused_on_every_hop(serve):
    allowed, other = serve(), serve()
    target = _image(other, "/x.png", png())
    hops = {"/to-other-port": target, "/to-ten": "http://10.0.0.1/x.png", "/to-metadata": "http://169.254.169.254/",
            "/to-file": "file:///etc/passwd", "/to-self": "/x.png", "/loop": "/loop"}
    for path, location in hops.items():
        allowed.routes[path] = lambda h, location=location: _reply(h, 302, b"", {"Location": location})
    _image(allowed, "/x.png", png((5, 5, 5)))
    results = _only(allowed).fetch_all([(allowed.base + path, None) for path in hops])
    assert [getattr(r, "reason", r) for r in results] == [
        "private_address", "private_address", "private_address", "unsupported_scheme", png((5, 5, 5)),
        "too_many_redirects"]
    assert other.hits == {}  # the redirect target was never contacted
    assert all(str(r) == f"{r.reason}: {allowed.base}{path}"  # messages name the URL asked for, nothing internal
               for r, path in zip(results, hops) if isinstance(r, FetchError))


def test_allowed_addresses_must_parse():
    assert Fetcher(allow_addresses=("10.0.0.0/8", "[::1]:80", "127.0.0.1")).allows(
        __import__("ipaddress").ip_address("10.1.2.3"), 443)
    with pytest.raises(MMError, match="allowed address"):
        Fetcher(allow_addresses=("localhost:80",))


# ----- downloader: deadline ---------------------------------------------------------------------------------
def _trickle_body(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    for _ in range(2000):  # 100 s in all, one byte every 50 ms: each read well within the per-read timeout
        handler.wfile.write(b"x")
        time.sleep(0.05)


def _trickle_headers(handler):
    handler.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
    for _ in range(2000):
        handler.wfile.write(b"a")
        time.sleep(0.05)


@pytest.mark.parametrize("route", [_trickle_body, _trickle_headers], ids=["body", "headers"])
def test_slow_server_is_stopped_by_the_total_deadline(serve, route):
    server = serve()
    server.routes["/slow.png"] = route
    fetcher = Fetcher(timeout=1.0, deadline=0.6, retries=2, allow_addresses=(f"127.0.0.1:{server.port}",))
    start = time.monotonic()
    error, = fetcher.fetch_all([(server.base + "/slow.png", None)])
    assert error.reason == "deadline" and time.monotonic() - start < 2.5
    assert server.hits["/slow.png"] == 1  # a deadline is not retried


# ----- mOSCAR: sha512 per row, unverified images ------------------------------------------------------------
def _moscar(path, rows):
    """``rows``: one image each, ``(url, sha512 or None)``, plus a text node."""
    pq.write_table(pa.table({
        "images": [[{"img_idx": "#000000", "sha512": sha, "url": url}] for url, sha in rows],
        "text": [[{"text": f"doc {i}", "text_idx": "#000001"}] for i in range(len(rows))],
        "metadata": [[{"node_order": "img_#000000|txt_#000001", "url": f"u{i}"}] for i in range(len(rows))]}),
        path)


def test_moscar_null_sha512_is_unverified_dropped_by_default_kept_with_flag(tmp_path, serve):
    server = serve()
    url = _image(server, "/x.png", png())
    _moscar(tmp_path / "x.parquet", [(url, None), (url, "")])
    stats = convert_moscar([tmp_path / "x.parquet"], tmp_path / "drop", _only(server), progress=False)
    assert stats["written"] == 0 and stats["image_failures"] == {"unverified": 2}
    assert server.hits == {}  # not even downloaded
    stats = convert_moscar([tmp_path / "x.parquet"], tmp_path / "keep", _only(server), progress=False,
                           keep_unverified=True)
    assert stats["written"] == 2 and stats["images_unverified"] == 2 and stats["image_failures"] == {}
    assert [imgs for _, _, imgs in iter_docs(tmp_path / "keep")] == [[png()], [png()]]


def test_moscar_repeated_url_is_checked_against_each_rows_own_sha512(tmp_path, serve):
    server = serve()
    url = _image(server, "/x.png", png())
    right, wrong = hashlib.sha512(png()).hexdigest(), hashlib.sha512(b"something else").hexdigest()
    _moscar(tmp_path / "x.parquet", [(url, wrong), (url, right), (url, wrong.upper())])
    stats = convert_moscar([tmp_path / "x.parquet"], tmp_path / "out", _only(server), progress=False)
    assert stats["written"] == 1 and stats["image_failures"] == {"sha512_mismatch": 2}
    (_, doc, imgs), = iter_docs(tmp_path / "out")
    assert doc["source"]["row"] == 1 and imgs == [png()]
    assert server.hits["/x.png"] == 1  # downloaded once, checked three times


def test_moscar_mirror_refuses_symlinks_out_and_files_not_matching_their_name(tmp_path):
    good, secret, liar = png((1, 1, 1)), png((2, 2, 2)), png((3, 3, 3))
    sha = {name: hashlib.sha512(data).hexdigest() for name, data in
           {"good": good, "secret": secret, "liar": liar, "text": b"not an image"}.items()}
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / f"{sha['good']}.png").write_bytes(good)
    (tmp_path / "secret.png").write_bytes(secret)
    os.symlink(tmp_path / "secret.png", mirror / f"{sha['secret']}.png")
    (mirror / f"{sha['liar']}.png").write_bytes(good)  # named for one image, holding another
    (mirror / f"{sha['text']}.jpg").write_bytes(b"not an image")
    results = Mirror(mirror).fetch_all([("u", sha[name]) for name in ("good", "secret", "liar", "text")])
    assert results[0] == good
    assert [r.reason for r in results[1:]] == ["outside_mirror", "sha512_mismatch", "undecodable"]
