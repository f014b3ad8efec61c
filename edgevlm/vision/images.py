"""Safe image decoding: paths, bytes, data URLs and PIL images -> RGB pixels.

Images are decoded once, EXIF orientation applied, converted to RGB and
identified by a content hash of the decoded pixels (so the same picture saved
as PNG and as a lossless re-encode share cache entries, while a different
crop does not).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevlm.errors import ImageError, ImageNotFoundError, InvalidRequestError

#: Images with more pixels than this are refused (decompression-bomb guard).
MAX_PIXELS = 12_000 * 12_000
#: Images whose longer side exceeds this are downscaled before hashing/encoding.
MAX_SIDE = 4096


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
    """Import PIL and its common format plugins now (load time), not in the first request."""
    from PIL import Image, ImageOps  # noqa: F401

    Image.preinit()


def load_image(image: Any, *, max_side: int = MAX_SIDE) -> LoadedImage:
    """Decode ``image`` (path, bytes, data URL, file:// URL or PIL image).

    Raises:
        ImageError: the file is missing, not an image, truncated or too large.
        InvalidRequestError: a remote URL was given (edgevlm never downloads).
    """
    from PIL import Image, ImageOps

    pil, source = _open(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if pil.width * pil.height > MAX_PIXELS:
                raise ImageError(f"{source}: {pil.width}x{pil.height} pixels is more than "
                                 f"edgevlm accepts ({MAX_PIXELS}); downscale it first")
            if pil.format == "JPEG" and max(pil.size) > 2 * max_side:
                pil.draft("RGB", (max_side, max_side))  # cheap DCT-domain downscale
            pil = ImageOps.exif_transpose(pil)
            pil = pil.convert("RGB")
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{source}: could not decode the image ({exc})") from exc
    if max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                         Image.BICUBIC)
    rgb = pil.tobytes()
    digest = hashlib.sha256(f"{pil.width}x{pil.height}:".encode() + rgb).hexdigest()
    return LoadedImage(pil.width, pil.height, rgb, digest, source)


def _open(image: Any) -> tuple[Any, str]:
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image, "<PIL image>"
    if isinstance(image, (bytes, bytearray, memoryview)):
        data, source = bytes(image), "<image bytes>"
    elif isinstance(image, (str, os.PathLike)):
        data, source = _read_reference(os.fspath(image))
    else:
        raise InvalidRequestError(
            f"an image must be a path, bytes, a data: URL or a PIL image, not {type(image).__name__}")
    try:
        pil = Image.open(io.BytesIO(data))
        pil.load() if pil.format != "JPEG" else None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(f"{source} is not a readable image ({exc}); use PNG, JPEG, WebP, GIF or BMP") from exc
    return pil, source


def _read_reference(ref: str) -> tuple[bytes, str]:
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise InvalidRequestError("data: image URLs must be base64-encoded (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=False), "<data URL>"
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"the data: URL is not valid base64 ({exc})") from exc
    if ref.startswith(("http://", "https://")):
        raise InvalidRequestError(
            f"{ref[:80]}: edgevlm does not download images; save it and pass the file path")
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ImageNotFoundError(f"image file not found: {path}")
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise ImageError(f"could not read image {path}: {exc}") from exc
