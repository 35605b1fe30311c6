"""Remote images: off by default; when on, non-public addresses are refused, and a download has a deadline and a
size cap. Every request goes to a server on 127.0.0.1 started by the test (or is refused before connecting)."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mmrlsd.data import remote
from mmrlsd.data.remote import RemotePolicy, address_allowed
from mmrlsd.data.sources import FieldMap, RecordLimits, load_dataset_files
from mmrlsd.errors import ImageError


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/img.png":
            body = _png()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif (
            self.path == "/drip"
        ):  # never finishes: one byte every 0.2 s, each read well inside a socket timeout
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif self.path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/big-streamed":  # no Content-Length: the cap applies while reading
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif self.path == "/to-img":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture
def allow_test_server(monkeypatch):
    """Lets the fetcher reach the test's own 127.0.0.1 server; every other non-public address stays refused."""
    real = remote.address_allowed
    monkeypatch.setattr(remote, "address_allowed", lambda ip: ip == "127.0.0.1" or real(ip))


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "172.16.0.5", "192.168.1.1", "169.254.169.254", "0.0.0.0",
                                "224.0.0.1", "100.64.0.1", "::1", "fe80::1%eth0", "fc00::1", "::ffff:127.0.0.1",
                                "::ffff:10.0.0.1"])  # fmt: skip
def test_non_public_addresses_are_refused(ip):
    assert not address_allowed(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(ip):
    assert address_allowed(ip)


def test_loopback_server_is_refused_without_connecting(server):
    with pytest.raises(
        ImageError, match=r"host '127\.0\.0\.1' resolves to a non-public address \(127\.0\.0\.1\)"
    ):
        RemotePolicy(timeout=5).fetch(f"{server}/img.png")
    with pytest.raises(ImageError, match=r"host 'localhost' resolves to a non-public address"):
        RemotePolicy(timeout=5).fetch("http://localhost:9/img.png")


def test_fetch_deadline_size_cap_and_redirects(server, allow_test_server):
    policy = RemotePolicy(timeout=1.0, max_bytes=1_000_000)
    assert policy.fetch(f"{server}/img.png") == _png()
    assert policy.fetch(f"{server}/to-img") == _png()
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=r"/drip: download timed out after 1 s"):
        policy.fetch(f"{server}/drip")
    assert time.monotonic() - t0 < 2.5  # the whole download is bounded, not each read
    with pytest.raises(
        ImageError, match=r"/big-declared: 1,000,000,000 bytes exceeds the 1,000,000-byte limit"
    ):
        policy.fetch(f"{server}/big-declared")
    with pytest.raises(ImageError, match=r"/big-streamed: response exceeds the 1,000,000-byte limit"):
        policy.fetch(f"{server}/big-streamed")
    with pytest.raises(ImageError, match=r"169\.254\.169\.254/latest/meta-data/: host '169\.254\.169\.254' resolves "
                                         r"to a non-public address"):  # fmt: skip
        policy.fetch(f"{server}/to-metadata")
    with pytest.raises(ImageError, match=r"/missing: HTTP 404"):
        policy.fetch(f"{server}/missing")


def test_remote_records_through_the_dataset(server, allow_test_server, tmp_path):
    """With `allow_remote_images` a URL record loads; a hanging one is skipped after the deadline, named."""
    path = tmp_path / "t.jsonl"
    recs = [{"id": "slow", "problem": "q?", "answer": "1", "images": [f"{server}/drip"]},
            {"id": "web", "problem": "q?", "answer": "1", "images": [f"{server}/img.png"]}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    off = load_dataset_files([str(path)], FieldMap())
    assert [s.id for s in off.skipped] == ["slow", "web"]
    assert all("remote images are off (set data.allow_remote_images: true)" in s.reason for s in off.skipped)
    limits = RecordLimits(allow_remote_images=True, remote_image_timeout=1.0)
    data = load_dataset_files([str(path)], FieldMap(), shuffle=False, limits=limits)
    (sample,) = data.next_batch(1)
    assert sample.id == "web" and sample.pil_images[0].size == (48, 40)
    assert [(s.id, s.reason) for s in data.skipped] == [
        ("slow", f"{server}/drip: download timed out after 1 s")
    ]
