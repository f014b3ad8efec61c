"""Safe image decoding: paths, bytes, data URLs and PIL images -> RGB pixels.

Images are decoded once, EXIF orientation applied, converted to RGB and
identified by a content hash of the decoded pixels (so the same picture saved
as PNG and as a lossless re-encode share cache entries, while a different
crop does not).

Input is untrusted. Every failure is one :class:`~edgevlm.errors.ImageError`
line (``ImageNotFoundError`` for a missing file; ``InvalidRequestError`` for a
remote URL or a value that is not an image reference at all):

* the size is checked from the header, before any pixel is decoded
  (decompression bombs never allocate);
* only the formats in :data:`FORMATS` are opened (no Ghostscript-backed EPS,
  no rarely used plugins);
* PIL warnings (decompression-bomb, truncated EXIF, palette transparency...)
  are silenced while decoding: they never reach the caller. (This uses
  ``warnings.catch_warnings``, which swaps the process-wide filters: another
  thread warning during a decode may lose its warning too.)

Pixels follow PIL's ``convert("RGB")`` -- what the Hugging Face processors do
-- so alpha is dropped (not composited on white) and palette transparency is
ignored; ICC profiles are not applied. One deliberate exception: 16-bit
grayscale (``I;16``), which ``convert("RGB")`` clips to white, is mapped to
8 bits by its high byte, as PIL already does for 16-bit RGB(A) PNGs.

Memory: large JPEGs are DCT-downscaled while decoding (``draft``); other
formats are decoded once at full size in their own mode and then converted
and resized band by band, so the peak is one decoded copy plus the small
result (see ``tests/vision/test_intake.py`` for measured figures).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import re
import stat
import struct
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Union

from edgevlm.errors import ImageError, ImageNotFoundError, InvalidRequestError

if TYPE_CHECKING:
    from PIL import Image as PILImage

#: Images with more pixels than this are refused (decompression-bomb guard).
MAX_PIXELS = 12_000 * 12_000
#: Images whose longer side exceeds this are downscaled before hashing/encoding.
MAX_SIDE = 4096
#: Container formats edgevlm opens (PIL format names; those PIL lacks are skipped).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "AVIF", "HEIF")

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "PILImage.Image"]

_SUPPORTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"
_BAND_ROWS = 64  # output rows converted and resized at a time
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>|'<[^']*>'")
#: EXIF orientation -> PIL transpose method name (EXIF 2.3, tag 0x0112).
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
#: Leading bytes of the formats edgevlm opens, to tell "damaged" from "not an image".
_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
#: Exceptions PIL's decoders raise on malformed input (beyond OSError/SyntaxError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError,
                  TypeError, ZeroDivisionError)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image.

    Attributes:
        width, height: size in pixels.
        rgb: packed RGB bytes, row-major (width * height * 3).
        digest: sha256 of size + pixels, hex; the image's identity in caches.
        source: a short description of where it came from (for messages).
    """

    width: int
    height: int
    rgb: bytes = field(repr=False)
    digest: str
    source: str


def preload_decoders() -> None:
    """Import PIL and the format plugins edgevlm opens now (load time), not in the first request."""
    _formats()


def load_image(image: ImageInput, *, max_side: int = MAX_SIDE) -> LoadedImage:
    """Decode ``image`` (path, bytes, data URL, file:// URL or PIL image) to RGB.

    The EXIF orientation is applied; an image whose longer side exceeds
    ``max_side`` is downscaled (bicubic) so that side is ``max_side``.

    Args:
        image: a file path (``str``/``PathLike``, ``~`` expanded), a
            ``file://`` URL, a ``data:image/...;base64,...`` URL, the encoded
            file's bytes, or a ``PIL.Image.Image``. Animated images give their
            first frame.
        max_side: longest side of the result in pixels.

    Returns:
        The decoded image with its content digest.

    Raises:
        ImageNotFoundError: the file does not exist.
        ImageError: a folder, an empty, truncated or corrupt file, a format
            edgevlm does not open, bad data: URL / base64, or more than
            :data:`MAX_PIXELS` pixels.
        InvalidRequestError: a remote URL (edgevlm never downloads) or a
            value of the wrong type.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = _decode(image, "the PIL image", max_side)
        source = "the PIL image"
    else:
        fp, source = _open_input(image)
        with fp:
            pil = _decode(fp, source, max_side)
    rgb, digest = _pixels(pil)
    return LoadedImage(pil.width, pil.height, rgb, digest, source)


def image_size(image: ImageInput) -> tuple[int, int]:
    """The (width, height) an image's header declares; no pixel is decoded (for limits and pricing).

    Works for any size, decompression bombs included (they are refused only
    when decoded). The EXIF orientation is not applied.

    Raises:
        ImageNotFoundError, ImageError, InvalidRequestError: as :func:`load_image`.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size
    fp, source = _open_input(image)
    with fp:
        size = _declared_size(fp)
        if size is None:
            fp.seek(0)
            raise ImageError(f"{source}: not a readable image ({_sniff(fp.read(64))}); use {_SUPPORTED}")
    return size


# --------------------------------------------------------------------------- inputs

def _open_input(image: object) -> tuple[IO[bytes], str]:
    """A readable binary stream for a path / URL / bytes input, and its description."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _bytes_stream(bytes(image), "the image bytes"), "the image bytes"
    if isinstance(image, (str, os.PathLike)):
        ref = os.fspath(image)
        if isinstance(ref, bytes):
            ref = os.fsdecode(ref)
        if ref.startswith("data:"):
            return _bytes_stream(_data_url_bytes(ref), "the data: URL image"), "the data: URL image"
        path = _local_path(ref)
        return _open_file(path), str(path)
    raise InvalidRequestError(f"an image must be a file path, bytes, a data: URL or a PIL image, "
                              f"not {type(image).__name__}")


def _bytes_stream(data: bytes, source: str) -> IO[bytes]:
    if not data:
        raise ImageError(f"{source}: empty (0 bytes), not an image")
    return io.BytesIO(data)


def _data_url_bytes(ref: str) -> bytes:
    """The payload of an RFC 2397 data: URL (base64 or percent-encoded)."""
    header, comma, payload = ref.partition(",")
    if not comma:
        raise ImageError("the data: URL has no ',' before its data; expected data:image/png;base64,<data>")
    if not header.lower().endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload)
    text = re.sub(r"\s+", "", urllib.parse.unquote(payload)).replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"the data: URL's base64 data is invalid ({_reason(exc)}); encode the file "
                         f"with standard base64 (data:image/png;base64,...)") from exc


def _local_path(ref: str) -> Path:
    """The local path a str reference names; refuses remote URLs."""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", ref)
    if scheme and scheme.group(1).lower() != "file":
        raise InvalidRequestError(f"{_short(ref)}: edgevlm does not download images; "
                                  f"save it and pass the file path")
    if scheme:
        parsed = urllib.parse.urlparse(ref)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidRequestError(f"{_short(ref)}: file:// URLs on another host are not supported; "
                                      f"pass a local file path")
        raw = urllib.request.url2pathname(parsed.path)
        ref = raw if os.path.exists(raw) else urllib.parse.unquote(raw)
    if not ref.strip():
        raise ImageError("the image path is empty; pass an image file path")
    if "\x00" in ref:
        raise ImageError(f"{_short(ref)!r} is not a file path (it contains a NUL character)")
    return Path(ref).expanduser()


def _open_file(path: Path) -> IO[bytes]:
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise ImageNotFoundError(f"image file not found: {_short(str(path))}; check the path") from exc
    except OSError as exc:
        hint = ("; to pass base64 data use a data:image/...;base64, URL"
                if len(str(path)) > 255 and "/" not in str(path)[:255] else "")
        raise ImageError(f"{_short(str(path))}: not a usable file path ({_reason(exc)}){hint}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{path} is a folder, not an image file; pass one of the image files in it")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path} is not a regular file (a device, pipe or socket); pass an image file")
    if info.st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes), not an image")
    try:
        return path.open("rb")
    except OSError as exc:
        raise ImageError(f"could not read image {path}: {_reason(exc)}") from exc


# --------------------------------------------------------------------------- decoding

def _decode(image: IO[bytes] | PILImage.Image, source: str, max_side: int) -> PILImage.Image:
    """Open (streams), check the header size, decode, downscale, orient: an RGB image."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        owned = not isinstance(image, Image.Image)
        pil = _identify(image, source) if owned else image
        _check_size(pil.size, source)
        try:
            target = _target_size(pil.size, max_side)
            if owned and target != pil.size:
                pil.draft("RGB", target)  # JPEG: DCT-domain downscale while decoding
            pil.load()
            orientation = _orientation(pil)
            rgb = _to_rgb(pil) if target == pil.size else _resize_to_rgb(pil, target)
            del pil
            method = _ORIENTATION.get(orientation)
            return rgb.transpose(getattr(Image.Transpose, method)) if method else rgb
        except MemoryError as exc:
            raise ImageError(f"{source}: not enough memory to decode the image; "
                             f"downscale it (to {max_side} px on the long side) first") from exc
        except _DECODE_ERRORS as exc:
            raise ImageError(_decode_failure(source, exc)) from exc


def _identify(fp: IO[bytes], source: str) -> PILImage.Image:
    """``PIL.Image.open`` restricted to :data:`FORMATS`; reads the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(fp, formats=_formats())
    except Image.DecompressionBombError as exc:
        size = _declared_size(fp)
        if size is None:
            raise ImageError(f"{source}: {_reason(exc)}; edgevlm accepts at most {MAX_PIXELS} pixels, "
                             f"downscale it first") from exc
        _check_size(size, source, limit=min(MAX_PIXELS, _pil_limit()))
        raise ImageError(f"{source}: {_reason(exc)}") from exc  # pragma: no cover - size passed the check
    except UnidentifiedImageError as exc:
        fp.seek(0)
        raise ImageError(f"{source}: not a readable image ({_sniff(fp.read(64))}); "
                         f"use {_SUPPORTED}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(_decode_failure(source, exc)) from exc


def _formats() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _declared_size(fp: IO[bytes]) -> tuple[int, int] | None:
    """The size a header declares, without PIL's bomb check (which hides it): header only."""
    from PIL import Image

    fp.seek(0)
    prefix = fp.read(16)
    for name in _formats():
        factory, accept = Image.OPEN[name]
        try:
            if accept is None or accept(prefix) is True:
                fp.seek(0)
                return factory(fp, "").size
        except Exception:  # noqa: BLE001 - identification only; the caller reports the bomb
            continue
    return None


def _pil_limit() -> int:
    from PIL import Image

    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else MAX_PIXELS


def _check_size(size: tuple[int, int], source: str, *, limit: int = MAX_PIXELS) -> None:
    width, height = size
    side = math.isqrt(limit)
    if width <= 0 or height <= 0:
        raise ImageError(f"{source}: the header declares a {width}x{height} image; the file is corrupt")
    if width * height > limit:
        raise ImageError(
            f"{source}: {width}x{height} is {width * height / 1e6:.0f} megapixels, more than edgevlm "
            f"decodes ({limit / 1e6:.0f} megapixels, e.g. {side}x{side}; refused from the header, "
            f"nothing was decoded); downscale it first, e.g. to {MAX_SIDE} px on the long side")


def _target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    if max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def intake_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The size :func:`load_image` gives an image of ``width`` x ``height`` (the long side capped
    at ``max_side``): what pricing an image by its size must plan, as the request will."""
    return _target_size((width, height), max_side)


def has_pixels(image: LoadedImage) -> bool:
    """False for a size-only image (``rgb`` empty; see ``edgevlm.families.base.blank_image``)."""
    return bool(image.rgb) or image.width * image.height == 0


def _orientation(pil: PILImage.Image) -> int:
    try:
        value = pil.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:  # corrupt EXIF: keep the stored orientation
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb(pil: PILImage.Image) -> PILImage.Image:
    """PIL's ``convert("RGB")``, except 16-bit grayscale maps its high byte (not clipped to white)."""
    from PIL import Image

    if pil.mode == "RGB":
        return pil
    if pil.mode.startswith("I;16"):
        import numpy as np

        gray = (np.asarray(pil).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return pil.convert("RGB")


def _resize_to_rgb(pil: PILImage.Image, target: tuple[int, int]) -> PILImage.Image:
    """``_to_rgb(pil).resize(target, BICUBIC)`` computed in bands of output rows.

    Only a band (plus the filter's support) is converted at a time, so the
    peak is the decoded image plus the result, not several full-size copies.
    The sampling is the whole-image one (``box`` keeps each band's offset);
    PIL picks the order of its two 1-D passes by image size, so on inputs
    where it would go vertical-first for the whole image the 8-bit rounding
    between passes differs (measured: <= 1 level on smooth images, up to ~8
    on pure noise).
    """
    from PIL import Image

    width, height = pil.size
    out = Image.new("RGB", target)
    scale = height / target[1]
    margin = math.ceil(2 * max(scale, 1.0)) + 2  # bicubic support: 2 output pixels each side
    for top in range(0, target[1], _BAND_ROWS):
        bottom = min(top + _BAND_ROWS, target[1])
        y0, y1 = top * scale, (height if bottom == target[1] else bottom * scale)
        c0, c1 = max(0, math.floor(y0) - margin), min(height, math.ceil(y1) + margin)
        band = _to_rgb(pil.crop((0, c0, width, c1)))
        out.paste(band.resize((target[0], bottom - top), Image.Resampling.BICUBIC,
                              box=(0, y0 - c0, width, y1 - c0)), (0, top))
    return out


def _pixels(pil: PILImage.Image) -> tuple[bytes, str]:
    """Packed RGB bytes and their digest, built in bands.

    ``tobytes()`` of the whole image would briefly hold the bytes twice
    (chunks, then their join); ``BytesIO.getvalue`` hands over its buffer.
    """
    width, height = pil.size
    digest = hashlib.sha256(f"{width}x{height}:".encode())
    out = io.BytesIO()
    rows = max(1, (1 << 20) // width)
    for top in range(0, height, rows):
        chunk = (pil if rows >= height else pil.crop((0, top, width, min(height, top + rows)))).tobytes()
        digest.update(chunk)
        out.write(chunk)
    return out.getvalue(), digest.hexdigest()


# --------------------------------------------------------------------------- messages

def _decode_failure(source: str, exc: BaseException) -> str:
    reason = _reason(exc)
    if "truncated" in reason.lower() or isinstance(exc, EOFError):
        return f"{source}: truncated image data ({reason}); re-export or re-download it"
    return f"{source}: the image is corrupt or cut short ({reason}); re-export it, e.g. as PNG or JPEG"


def _reason(exc: BaseException) -> str:
    """``str(exc)`` on one line, without object reprs, at most 160 characters."""
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = _REPR.sub("the data", " ".join(message.split())) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def _sniff(prefix: bytes) -> str:
    """A guess at what a non-image file is, for the message."""
    for magic, name in _MAGIC:
        if prefix.startswith(magic):
            return f"it starts like a {name} file but its header is damaged or cut short"
    head = prefix.lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "it is an HTML page, perhaps a failed download"
    if head.startswith((b"<?xml", b"<svg")):
        return "it is XML/SVG; vector images are not supported"
    try:
        text = prefix.decode("utf-8")
    except UnicodeDecodeError:
        return "not a format edgevlm opens"
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "it is a text file"
    return "not a format edgevlm opens"


def resized(image: LoadedImage, width: int, height: int) -> LoadedImage:
    """``image`` resized (bicubic) to ``width`` x ``height``, with its own digest (a new cache identity)."""
    from PIL import Image

    if (width, height) == (image.width, image.height):
        return image
    if not has_pixels(image):  # a size-only image stays one (pricing allocates no pixels)
        w, h = max(1, width), max(1, height)
        return LoadedImage(w, h, b"", f"blank-{w}x{h}", image.source)
    pil = Image.frombytes("RGB", (image.width, image.height), image.rgb)
    rgb, digest = _pixels(pil.resize((max(1, width), max(1, height)), Image.Resampling.BICUBIC))
    return LoadedImage(max(1, width), max(1, height), rgb, digest, image.source)


def to_pil(image: LoadedImage) -> PILImage.Image:
    """The image as a PIL RGB image (a copy of its pixels; mid-grey for a size-only image)."""
    from PIL import Image

    if not has_pixels(image):
        return Image.new("RGB", (image.width, image.height), (128, 128, 128))
    return Image.frombytes("RGB", (image.width, image.height), image.rgb)
