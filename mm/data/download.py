"""Fetching images by URL for the converters: concurrent threads, timeouts, a size cap, retries with backoff,
sha512 verification and a decode check. Failures are returned (with a reason), never raised."""
from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mm.errors import MMError
from mm.images import open_image


class FetchError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Fetcher:
    timeout: float = 10.0  # seconds per attempt (connect and each read)
    max_bytes: int = 32 << 20  # larger responses are refused
    retries: int = 2  # extra attempts after a timeout, a connection error, 429 or 5xx
    workers: int = 16
    backoff: float = 0.5  # seconds, doubled per retry
    user_agent: str = "mm-convert/1"

    def fetch(self, url: str, sha512: str | None = None) -> bytes:
        """The verified bytes of one image; raises FetchError."""
        for attempt in range(self.retries + 1):
            try:
                data = self._get(url)
                break
            except FetchError as exc:
                if exc.reason != "transient" or attempt == self.retries:
                    raise
                time.sleep(self.backoff * 2**attempt)
        if sha512 and hashlib.sha512(data).hexdigest() != sha512.lower():
            raise FetchError("sha512_mismatch", url)
        try:
            open_image(data, url)
        except MMError as exc:
            raise FetchError("undecodable", str(exc)) from None
        return data

    def _get(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": self.user_agent})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                length = response.headers.get("Content-Length")
                if length and int(length) > self.max_bytes:
                    raise FetchError("too_large", f"{url}: {length} bytes")
                data = response.read(self.max_bytes + 1)
        except urllib.error.HTTPError as exc:
            transient = exc.code == 429 or exc.code >= 500
            raise FetchError("transient" if transient else "http_error", f"{url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            raise FetchError("transient", f"{url}: {exc}") from None
        except ValueError as exc:  # malformed URL
            raise FetchError("bad_url", f"{url}: {exc}") from None
        if len(data) > self.max_bytes:
            raise FetchError("too_large", f"{url}: over {self.max_bytes} bytes")
        return data

    def fetch_all(self, requests: list[tuple[str, str | None]]) -> list[bytes | FetchError]:
        """Fetch ``(url, sha512)`` pairs concurrently; results in input order, a FetchError for each failure."""

        def one(request):
            try:
                return self.fetch(*request)
            except FetchError as exc:
                if exc.reason == "transient":
                    exc.reason = "unreachable"
                return exc

        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(requests)))) as pool:
            return list(pool.map(one, requests))
