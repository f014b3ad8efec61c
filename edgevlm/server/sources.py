"""Where a request's images may come from, and the bytes they are.

An ``image_url`` is accepted as a ``data:`` URL or raw base64 (always), a
``file://`` URL into one of the operator's ``--allow-dir`` folders (after
resolving ``..`` and symbolic links), or an ``http(s)://`` URL when the
operator allowed remote images (size and time limits; redirects only to
http(s)). Everything else is refused with a :class:`RequestRejected` that
names the part. Sizes are checked before anything is decoded: the encoded
bytes against ``max_image_bytes``, the pixel count read from the image's
header against ``max_image_pixels``.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from edgevlm.errors import EdgeVLMError, InvalidRequestError
from edgevlm.server.config import ServerConfig

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?),(?P<data>.*)$", re.DOTALL)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


class RequestRejected(InvalidRequestError):
    """A request the server answers with an HTTP 4xx (OpenAI-shaped error body).

    Attributes:
        status: the HTTP status.
        code: a short machine-readable reason (``invalid_image``, ...).
        param: the request field at fault (``messages[0].content[1].image_url``), if any.
    """

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def image_bytes(url: str, where: str, config: ServerConfig) -> bytes:
    """The encoded image an ``image_url`` names, within the server's policy and limits.

    Args:
        url: the part's URL (data URL, base64, file:// or http(s)://).
        where: the part's place in the request, for messages.
        config: the server's policy.

    Raises:
        RequestRejected: a refused source, bad base64, a missing or
            unreadable file, a failed download, or an image over the limits.
    """
    url = url.strip()
    if url.startswith("data:"):
        data = _from_data_url(url, where, config)
    elif url.lower().startswith("file:"):
        data = _from_file(url, where, config)
    elif url.lower().startswith(("http://", "https://")):
        data = _from_remote(url, where, config)
    elif _SCHEME.match(url) and not _looks_base64(url):
        scheme = url.split(":", 1)[0]
        raise _rejected(f"{where}: {scheme}: URLs are not accepted; send a data: URL or base64", where,
                        code="unsupported_image_source")
    else:
        data = _from_base64(url, where, config)
    check_pixels(data, where, config)
    return data


def check_pixels(data: bytes, where: str, config: ServerConfig) -> None:
    """Refuse an image whose header declares more than ``max_image_pixels`` (nothing is decoded)."""
    import edgevlm

    try:
        width, height = edgevlm.image_size(data)
    except EdgeVLMError:  # not readable here: the model's image intake says exactly why
        return
    if width * height > config.max_image_pixels:
        raise _rejected(f"{where}: the image is {width}x{height} ({width * height} pixels); this server "
                        f"accepts at most {config.max_image_pixels} pixels per image; downscale it first",
                        where, code="image_too_large")


def _rejected(message: str, where: str, *, code: str = "invalid_image", status: int = 400) -> RequestRejected:
    return RequestRejected(message, status=status, code=code, param=where)


def _check_size(n_bytes: int, where: str, config: ServerConfig) -> None:
    if n_bytes > config.max_image_bytes:
        raise _rejected(f"{where}: the image is {n_bytes} bytes; this server accepts at most "
                        f"{config.max_image_bytes} bytes per image", where, code="image_too_large")


def _looks_base64(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9+/=_\s-]+", text[:64]) is not None


def _decode_base64(text: str, where: str, config: ServerConfig) -> bytes:
    compact = "".join(text.split())
    _check_size(len(compact) * 3 // 4, where, config)  # before decoding anything
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _rejected(f"{where}: not valid base64 image data", where) from None


def _from_data_url(url: str, where: str, config: ServerConfig) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise _rejected(f"{where}: a malformed data: URL (expected data:image/...;base64,...)", where)
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise _rejected(f"{where}: a data: URL of type {mime}, not an image", where)
    if ";base64" not in match.group("params").lower():
        raise _rejected(f"{where}: a data: URL must be base64-encoded (data:image/png;base64,...)", where)
    return _decode_base64(match.group("data"), where, config)


def _from_base64(text: str, where: str, config: ServerConfig) -> bytes:
    if not _looks_base64(text):
        raise _rejected(f"{where}: neither a data: URL nor base64 image data", where)
    return _decode_base64(text, where, config)


def _from_file(url: str, where: str, config: ServerConfig) -> bytes:
    if not config.allow_dirs:
        raise _rejected(f"{where}: file:// image URLs are refused; the server must be started with "
                        f"--allow-dir DIR to read images from DIR", where, code="unsafe_image_source",
                        status=403)
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise _rejected(f"{where}: a file:// URL must not name a host", where, code="unsafe_image_source",
                        status=403)
    raw = urllib.parse.unquote(parsed.path)
    if "\x00" in raw:
        raise _rejected(f"{where}: the file:// path contains a NUL byte", where, code="unsafe_image_source",
                        status=403)
    try:
        path = Path(raw).resolve()  # ".." and symbolic links resolved before the containment check
    except (OSError, RuntimeError):
        raise _rejected(f"{where}: the file:// path cannot be resolved", where, code="unsafe_image_source",
                        status=403) from None
    if not any(path.is_relative_to(folder) for folder in config.allow_dirs):  # checked before existence
        raise _rejected(f"{where}: the file is outside the folders this server may read (--allow-dir)",
                        where, code="unsafe_image_source", status=403)
    if not path.exists():
        raise _rejected(f"{where}: no such image file", where, code="image_not_found", status=404)
    if not path.is_file():
        raise _rejected(f"{where}: not a regular file", where)
    _check_size(path.stat().st_size, where, config)
    return path.read_bytes()


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s) URLs (never file: or ftp:)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http URL refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _from_remote(url: str, where: str, config: ServerConfig) -> bytes:
    if not config.allow_remote_images:
        raise _rejected(f"{where}: remote image URLs are refused; send the image as a data: URL or base64, "
                        f"or start the server with --allow-remote-images", where, code="unsafe_image_source",
                        status=403)
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "edgevlm-server"})
    try:
        with opener.open(request, timeout=config.remote_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit():
                _check_size(int(declared), where, config)
            data = _read_within(response, config, where)
    except RequestRejected:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise _rejected(f"{where}: the image could not be downloaded ({' '.join(str(reason).split())[:120]})",
                        where, code="image_download_failed") from None
    _check_size(len(data), where, config)
    return data


def _read_within(response: Any, config: ServerConfig, where: str) -> bytes:
    """The body, in chunks, within ``max_image_bytes`` and ``remote_timeout_s`` in all (not per read)."""
    deadline = time.monotonic() + config.remote_timeout_s
    chunks, size = [], 0
    while True:
        chunk = response.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        _check_size(size, where, config)
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise _rejected(f"{where}: the image download took longer than {config.remote_timeout_s:g} s",
                            where, code="image_download_failed")
