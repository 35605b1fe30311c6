"""Fetching `http(s)` images, only when `data.allow_remote_images` is on.

A dataset record decides which URL the trainer requests, so a fetch is bounded three ways:

- **time:** `timeout` seconds for the whole download (connect, headers and body), checked between reads;
- **size:** at most `max_bytes` (from `Content-Length` when the server sends it, and while reading);
- **address:** the host is resolved once and every address it resolves to must be public: loopback, private
  (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16, cloud metadata services), multicast, reserved
  and unspecified addresses are refused. The connection goes to the address that was checked (no second DNS
  lookup that could answer differently), and each redirect (at most `MAX_REDIRECTS`) is checked the same way.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from mmrlsd.errors import ImageError

MAX_REDIRECTS = 3


def address_allowed(ip: str) -> bool:
    """True for a public unicast address; False for loopback, private, link-local, multicast, reserved, ..."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def _resolve(host: str, port: int, url: str) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ImageError(f"{url}: cannot resolve host {host!r} ({e})") from None
    addrs = sorted({info[4][0] for info in infos})
    refused = [a for a in addrs if not address_allowed(a)]
    if refused or not addrs:
        raise ImageError(
            f"{url}: host {host!r} resolves to a non-public address ({', '.join(refused)}); refused"
        )
    return addrs[0]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, ip: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self):
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, ip: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        # the certificate is checked against the host name, not the address
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass(frozen=True)
class RemotePolicy:
    timeout: float = 10.0
    """Seconds for one image's whole download."""
    max_bytes: int = 20_000_000
    """Largest response body accepted."""

    def fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ImageError(f"{url}: only http(s) URLs with a host can be fetched")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            ip = _resolve(parts.hostname, port, url)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ImageError(f"{url}: download timed out after {self.timeout:g} s")
            cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
            conn = cls(parts.hostname, ip, port, timeout=left)
            try:
                path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                conn.request("GET", path, headers={"User-Agent": "mmrlsd", "Accept": "image/*"})
                sock = conn.sock  # the connection lets go of it once the response says it will close
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                    url = urljoin(url, resp.getheader("Location"))
                    continue
                if resp.status != 200:
                    raise ImageError(f"{url}: HTTP {resp.status} {resp.reason}")
                size = resp.getheader("Content-Length")
                if size and size.isdigit() and int(size) > self.max_bytes:
                    raise ImageError(f"{url}: {int(size):,} bytes exceeds the {self.max_bytes:,}-byte limit")
                return self._read(sock, resp, url, deadline)
            except (OSError, http.client.HTTPException) as e:  # socket.timeout is an OSError
                if isinstance(e, TimeoutError) or "timed out" in str(e):
                    raise ImageError(f"{url}: download timed out after {self.timeout:g} s") from None
                raise ImageError(f"{url}: download failed ({type(e).__name__}: {e})") from None
            finally:
                conn.close()
        raise ImageError(f"{url}: more than {MAX_REDIRECTS} redirects")

    def _read(self, sock, resp, url: str, deadline: float) -> bytes:
        chunks, total = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ImageError(f"{url}: download timed out after {self.timeout:g} s")
            # a server dripping bytes cannot stretch the download past the deadline
            sock.settimeout(left)
            chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageError(f"{url}: response exceeds the {self.max_bytes:,}-byte limit")
            chunks.append(chunk)
