"""Fetching ``http(s)://`` image URLs (``mm serve --allow-remote-images``) without opening the server's network.

Every hop (the URL, then each redirect, followed by hand) is checked before anything is sent to it: the scheme is
http or https; the host is resolved once and only public addresses are used (not loopback, private, carrier-grade
NAT, link-local, multicast, reserved or unspecified; IPv4 inside IPv6 judged as that IPv4) unless the address is
on the policy's allow-list; the connection goes to that checked address, with the URL's Host header and TLS server
name, so a second DNS answer cannot move it. One deadline covers resolving, connecting, every redirect and the
body; the body stops at the size limit. ``FetchFailed`` carries the reason (which may name internal hosts) for the
server log; the HTTP layer tells the client only that the fetch failed.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from mm.errors import MMError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchFailed(Exception):
    """A remote image could not be fetched; the message is for the server log only."""


class TooLarge(FetchFailed):
    """The response is over the size limit."""


def is_public(address: Address) -> bool:
    """Globally routable unicast. IPv4 carried in IPv6 (mapped, 6to4, NAT64) is judged as that IPv4."""
    if address.version == 6:
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            address = embedded
    return address.is_global and not address.is_multicast


def parse_allowed(entry: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]:
    """``ADDR``, ``ADDR:PORT``, ``[V6]:PORT`` or a network ``10.0.0.0/8`` -> (network, port or None)."""
    host, port = entry, None
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (rest or None)
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    try:
        network = ipaddress.ip_network(host, strict=False)
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(port)
    except ValueError:
        raise MMError(f"--allow-remote-address expects ADDR, ADDR:PORT, [V6ADDR]:PORT or a network, "
                      f"got {entry!r}") from None
    return network, int(port) if port is not None else None


class RemotePolicy:
    """Where remote images may come from and how long and large they may be; ``fetch`` applies it."""

    def __init__(self, allow: tuple[str, ...] = (), deadline: float = 10.0, max_redirects: int = 3):
        self.allow = [parse_allowed(entry) for entry in allow]  # reachable even when not public
        self.deadline = deadline  # seconds for the whole fetch, redirects included
        self.max_redirects = max_redirects

    def permits(self, address: Address, port: int) -> bool:
        if is_public(address):
            return True
        return any(address in network and allowed in (None, port) for network, allowed in self.allow)

    async def fetch(self, url: str, max_bytes: int) -> bytes:
        """The body of ``url`` (HTTP 200 only); FetchFailed (TooLarge for the size limit) otherwise."""
        try:
            return await asyncio.wait_for(self._fetch(url, max_bytes), self.deadline)
        except asyncio.TimeoutError:
            raise FetchFailed(f"{url}: not done within the {self.deadline} s deadline") from None
        except (httpx.HTTPError, httpx.InvalidURL, OSError, UnicodeError, ValueError) as exc:
            raise FetchFailed(f"{url}: {type(exc).__name__}: {exc}") from None

    async def _fetch(self, url: str, max_bytes: int) -> bytes:
        target = httpx.URL(url)
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.deadline) as client:
            for _ in range(self.max_redirects + 1):
                address = await self._resolve(target)
                request = client.build_request(
                    "GET", target.copy_with(host=address), extensions={"sni_hostname": target.host},
                    headers={"Host": target.netloc.decode("ascii"), "Accept": "image/*", "User-Agent": "mm-serve"})
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        target = target.join(response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise FetchFailed(f"{target}: HTTP {response.status_code}")
                    return await _read(response, max_bytes, target)
                finally:
                    await response.aclose()
        raise FetchFailed(f"{url}: more than {self.max_redirects} redirects")

    async def _resolve(self, url: httpx.URL) -> str:
        """The checked address to connect to for ``url``: resolved once; the first permitted answer."""
        if url.scheme not in ("http", "https") or not url.host:
            raise FetchFailed(f"{url}: not an http(s) URL")
        port = url.port or (443 if url.scheme == "https" else 80)
        answers = await asyncio.get_running_loop().getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(answer[4][0].partition("%")[0]) for answer in answers]
        for address in addresses:
            if self.permits(address, port):
                return str(address)
        raise FetchFailed(f"{url}: {url.host} resolves only to addresses that are not public "
                          f"({', '.join(sorted(set(map(str, addresses))))})")


async def _read(response: httpx.Response, max_bytes: int, url: httpx.URL) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"{url}: Content-Length {declared} over {max_bytes} bytes")
    body = bytearray()
    async for piece in response.aiter_bytes():  # decompressed: a gzip bomb stops at the limit too
        body += piece
        if len(body) > max_bytes:
            raise TooLarge(f"{url}: over {max_bytes} bytes")
    return bytes(body)
