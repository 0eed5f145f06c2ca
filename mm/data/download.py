"""Fetching images by URL for the converters, keeping data from strangers at arm's length (docs/security.md).

- Only ``http`` and ``https``. Redirects are followed by hand (at most ``max_redirects``), each hop checked anew.
- Every address a host resolves to is checked before connecting, and the connection goes to that checked address
  (no second lookup to rebind): loopback, private, link-local, multicast and other non-global addresses are
  refused unless ``allow_private`` or an ``allow_addresses`` entry allows them.
- A per-read timeout and a total ``deadline`` per URL (every hop, retry and read), a size cap, retries with
  backoff for timeouts, connection errors, 429 and 5xx.
- Each URL is downloaded once per ``fetch_all`` and decoded once; every request is checked against its own sha512.

Failures are returned as ``FetchError`` (a reason and the requested URL, nothing more), never raised from
``fetch_all``. Proxies from the environment are not used: the address check needs the direct connection.
"""
from __future__ import annotations

import hashlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from mm.errors import MMError
from mm.images import open_image

REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(Exception):
    """One failed image: ``reason`` (a short word to count by) and the URL that was asked for."""

    def __init__(self, reason: str, url: str = ""):
        super().__init__(f"{reason}: {url}" if url else reason)
        self.reason, self.url = reason, url


def parse_allowed(entries) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]]:
    """``"10.0.0.5"``, ``"10.0.0.0/8"``, ``"127.0.0.1:8000"``, ``"[::1]:8000"`` -> ``(network, port or None)``."""
    allowed = []
    for entry in entries:
        text, port = str(entry).strip(), None
        if text.startswith("["):  # [v6]:port
            text, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else (rest or None)
        elif text.count(":") == 1:  # v4:port
            text, port = text.split(":")
        try:
            network = ipaddress.ip_network(text, strict=False)
            port = None if port is None else int(port)
        except ValueError:
            raise MMError(f"allowed address {entry!r} is not ADDRESS, NETWORK/BITS, ADDRESS:PORT or "
                          f"[V6ADDRESS]:PORT") from None
        allowed.append((network, port))
    return allowed


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast (an IPv4-mapped IPv6 address is judged as its IPv4 address)."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _Deadline:
    """A timer that shuts the current connection down when a download's time is up, whatever it is waiting for
    (a slow header, a trickling body, a TLS handshake). It holds its own duplicate of the socket, so the
    shutdown always reaches the right connection."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._forget()
            if self.expired:
                raise TimeoutError
            self._sock = sock.dup()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _forget(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def release(self) -> None:
        with self._lock:
            self._forget()

    def cancel(self) -> None:
        self._timer.cancel()
        self.release()


@dataclass
class Fetcher:
    timeout: float = 10.0  # seconds per connect and per read
    deadline: float = 60.0  # seconds in all for one URL: every redirect, retry, backoff and read
    max_bytes: int = 32 << 20  # larger responses are refused
    retries: int = 2  # extra attempts after a timeout, a connection error, 429 or 5xx
    workers: int = 16
    backoff: float = 0.5  # seconds, doubled per retry
    max_redirects: int = 5
    allow_private: bool = False  # also connect to loopback, private, link-local and other non-global addresses
    allow_addresses: tuple[str, ...] = ()  # these only (ADDRESS, NETWORK/BITS, ADDRESS:PORT, [V6]:PORT)
    user_agent: str = "mm-convert/1"
    _allowed: list = field(init=False, repr=False)

    def __post_init__(self):
        if self.timeout <= 0 or self.deadline <= 0 or self.max_bytes < 1 or self.retries < 0 or self.workers < 1 \
                or self.max_redirects < 0:
            raise MMError("timeout, deadline, max_bytes and workers must be positive; retries and max_redirects "
                          ">= 0")
        self._allowed = parse_allowed(self.allow_addresses)

    def allows(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        if self.allow_private or is_public(ip):
            return True
        return any(ip in network and allowed_port in (None, port) for network, allowed_port in self._allowed)

    # ----- one request at a time ------------------------------------------------------------------------------
    def fetch(self, url: str, sha512: str | None = None) -> bytes:
        """The verified bytes of one image; raises FetchError."""
        result = self._verify(self._download_and_decode(url), url, sha512)
        if isinstance(result, FetchError):
            raise result
        return result

    def fetch_all(self, requests: list[tuple[str, str | None]]) -> list[bytes | FetchError]:
        """Fetch ``(url, sha512)`` pairs concurrently; results in input order, a FetchError for each failure.
        A URL asked for more than once is downloaded once and checked against each request's own sha512."""
        urls = list(dict.fromkeys(url for url, _ in requests))
        if not urls:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(urls)))) as pool:
            bodies = dict(zip(urls, pool.map(self._download_and_decode, urls)))
        return [self._verify(bodies[url], url, sha512) for url, sha512 in requests]

    @staticmethod
    def _verify(body, url, sha512):
        if isinstance(body, FetchError):
            return body
        data, decodable = body
        if sha512 and hashlib.sha512(data).hexdigest() != str(sha512).lower():
            return FetchError("sha512_mismatch", url)
        return data if decodable else FetchError("undecodable", url)

    def _download_and_decode(self, url) -> tuple[bytes, bool] | FetchError:
        try:
            data = self._download(url)
        except FetchError as exc:
            return FetchError("unreachable" if exc.reason == "transient" else exc.reason, exc.url)
        try:
            open_image(data, "download")
        except MMError:
            return data, False
        return data, True

    # ----- the network ----------------------------------------------------------------------------------------
    def _download(self, url) -> bytes:
        if not isinstance(url, str) or not url:
            raise FetchError("bad_url", str(url))
        deadline = _Deadline(self.deadline)
        attempt = 0
        try:
            while True:
                try:
                    return self._follow(url, deadline)
                except FetchError as exc:
                    pause = self.backoff * 2**attempt
                    if exc.reason != "transient" or attempt == self.retries:
                        raise
                    if deadline.remaining() <= pause:
                        raise FetchError("deadline", url) from None
                    time.sleep(pause)
                    attempt += 1
        finally:
            deadline.cancel()

    def _follow(self, url: str, deadline: _Deadline) -> bytes:
        """GET ``url``, following redirects by hand; every hop's scheme and addresses are checked."""
        target = url
        for _ in range(self.max_redirects + 1):
            try:
                parts = urlsplit(target)
                host, port = parts.hostname, parts.port
            except ValueError:
                raise FetchError("bad_url", url) from None
            if parts.scheme not in ("http", "https"):
                raise FetchError("unsupported_scheme", url)
            if not host:
                raise FetchError("bad_url", url)
            conn = None
            try:
                if parts.scheme == "https":
                    conn = http.client.HTTPSConnection(host, port or 443, timeout=self.timeout,
                                                       context=ssl.create_default_context())
                else:
                    conn = http.client.HTTPConnection(host, port or 80, timeout=self.timeout)
                conn._create_connection = lambda address, timeout, source=None: self._connect(address, url, deadline)
                path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                conn.request("GET", path, headers={"User-Agent": self.user_agent, "Accept": "image/*"})
                response = conn.getresponse()
                if response.status in REDIRECTS:
                    location = response.getheader("Location")
                    if not location:
                        raise FetchError("http_error", url)
                    target = urljoin(target, location.strip())
                    continue
                if response.status == 429 or response.status >= 500:
                    raise FetchError("transient", url)
                if not 200 <= response.status < 300:
                    raise FetchError("http_error", url)
                return self._read_body(response, url, deadline)
            except FetchError:
                raise
            except ssl.SSLError:
                raise FetchError("deadline" if deadline.expired else "tls_error", url) from None
            except (http.client.InvalidURL, ValueError):  # UnicodeError included
                raise FetchError("bad_url", url) from None
            except (OSError, http.client.HTTPException):
                raise FetchError("deadline" if deadline.expired else "transient", url) from None
            finally:
                deadline.release()
                if conn is not None:
                    conn.close()
        raise FetchError("too_many_redirects", url)

    def _connect(self, address: tuple[str, int], url: str, deadline: _Deadline) -> socket.socket:
        """Resolve, keep the allowed addresses, connect to one of them (replaces ``socket.create_connection``)."""
        host, port = address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        allowed = [info for info in infos if self.allows(ipaddress.ip_address(info[4][0].split("%")[0]), port)]
        if not allowed:
            raise FetchError("private_address", url)
        error: OSError = ConnectionError()
        for family, kind, proto, _, sockaddr in allowed:
            sock = socket.socket(family, kind, proto)
            try:
                deadline.watch(sock)
                sock.settimeout(max(0.001, min(self.timeout, deadline.remaining())))
                sock.connect(sockaddr)
                sock.settimeout(self.timeout)
                return sock
            except OSError as exc:
                deadline.release()
                sock.close()
                error = exc
        raise error

    def _read_body(self, response: http.client.HTTPResponse, url: str, deadline: _Deadline) -> bytes:
        length = response.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > self.max_bytes:
            raise FetchError("too_large", url)
        chunks, size = [], 0
        while chunk := response.read1(1 << 16):
            size += len(chunk)
            if size > self.max_bytes:
                raise FetchError("too_large", url)
            chunks.append(chunk)
            if deadline.remaining() <= 0:
                raise FetchError("deadline", url)
        if deadline.expired:
            raise FetchError("deadline", url)
        if length and length.strip().isdigit() and size != int(length):
            raise FetchError("transient", url)  # cut short
        return b"".join(chunks)
