"""Image sources under the server's policy: data URLs, base64, file:// in allowed folders, remote URLs."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from edgevlm.server.config import ServerConfig
from edgevlm.server.sources import RequestRejected, image_bytes


def _png(size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _rejected(url: str, config: ServerConfig, *, status: int, code: str) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        image_bytes(url, "messages[0].content[1]", config)
    assert info.value.status == status, info.value
    assert info.value.code == code, info.value
    assert info.value.param == "messages[0].content[1]"
    assert "messages[0].content[1]" in str(info.value)
    assert " at 0x" not in str(info.value) and "Traceback" not in str(info.value)
    return info.value


def test_data_url_and_raw_base64_give_the_bytes():
    png = _png()
    b64 = base64.b64encode(png).decode()
    config = ServerConfig()
    assert image_bytes(f"data:image/png;base64,{b64}", "p", config) == png
    assert image_bytes(b64, "p", config) == png
    assert image_bytes(f"data:image/png;base64,{b64[:40]}\n{b64[40:]}", "p", config) == png  # wrapped lines
    urlsafe = base64.urlsafe_b64encode(png).decode().rstrip("=")
    assert image_bytes(urlsafe, "p", config) == png


def test_bad_data_is_refused_naming_the_part():
    config = ServerConfig()
    _rejected("data:image/png;base64,@@@@", config, status=400, code="invalid_image")
    _rejected("data:text/plain;base64,aGVsbG8=", config, status=400, code="invalid_image")
    _rejected("data:image/png,rawbytes", config, status=400, code="invalid_image")
    _rejected("ftp://example.org/a.png", config, status=400, code="unsupported_image_source")
    _rejected("just some words, not base64!", config, status=400, code="invalid_image")


def test_size_limits_are_checked_before_decoding():
    png = _png((300, 200))
    small = ServerConfig(max_image_bytes=100)
    err = _rejected(base64.b64encode(png).decode(), small, status=400, code="image_too_large")
    assert "100 bytes" in str(err)
    few_pixels = ServerConfig(max_image_pixels=300 * 200 - 1)
    err = _rejected(base64.b64encode(png).decode(), few_pixels, status=400, code="image_too_large")
    assert "300x200" in str(err)


def test_decompression_bomb_refused_from_its_header():
    """A 30000x30000 PNG header on a tiny file: refused from the declared size, nothing decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    err = _rejected(base64.b64encode(bomb).decode(), ServerConfig(), status=400, code="image_too_large")
    assert "30000x30000" in str(err)


def test_file_urls_need_an_allowed_folder(tmp_path: Path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(_png())
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png((5, 5)))
    (allowed / "link.png").symlink_to(secret)
    (allowed / "sub").mkdir()

    _rejected(f"file://{allowed / 'a.png'}", ServerConfig(), status=403, code="unsafe_image_source")
    config = ServerConfig(allow_dirs=(allowed,))
    assert image_bytes(f"file://{allowed / 'a.png'}", "p", config) == (allowed / "a.png").read_bytes()
    assert image_bytes(f"file://{allowed}/sub/../a.png", "p", config) == (allowed / "a.png").read_bytes()
    for trick in (f"file://{allowed}/../secret.png", f"file://{allowed}/%2e%2e/secret.png",
                  f"file://{allowed / 'link.png'}", "file:///etc/passwd", f"file://{tmp_path}/allowed-not/x.png"):
        err = _rejected(trick, config, status=403, code="unsafe_image_source")  # existence never revealed
        assert str(secret) not in str(err) and "passwd" not in str(err)  # messages never echo paths outside
    _rejected(f"file://otherhost{allowed / 'a.png'}", config, status=403, code="unsafe_image_source")
    _rejected(f"file://{allowed / 'missing.png'}", config, status=404, code="image_not_found")
    _rejected(f"file://{allowed / 'sub'}", config, status=400, code="invalid_image")


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loopback_http():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler.routes
    server.shutdown()
    _Handler.routes.clear()


def test_remote_images_only_when_allowed(loopback_http, tmp_path: Path):
    base, routes = loopback_http
    png = _png()
    routes["/a.png"] = (200, {"Content-Type": "image/png"}, png)
    routes["/big.png"] = (200, {"Content-Type": "image/png"}, b"\0" * 5000)
    routes["/to-file"] = (302, {"Location": f"file://{tmp_path}/x.png"}, b"")
    routes["/to-a"] = (302, {"Location": f"{base}/a.png"}, b"")

    _rejected(f"{base}/a.png", ServerConfig(), status=403, code="unsafe_image_source")
    config = ServerConfig(allow_remote_images=True, max_image_bytes=4096, remote_timeout_s=5)
    assert image_bytes(f"{base}/a.png", "p", config) == png
    assert image_bytes(f"{base}/to-a", "p", config) == png
    _rejected(f"{base}/big.png", config, status=400, code="image_too_large")
    _rejected(f"{base}/to-file", config, status=400, code="image_download_failed")
    _rejected(f"{base}/nothing", config, status=400, code="image_download_failed")


def test_allow_dirs_are_resolved(tmp_path: Path):
    link = tmp_path / "link"
    os.symlink(tmp_path, link)
    assert ServerConfig(allow_dirs=(link,)).allow_dirs == (tmp_path.resolve(),)
