"""Image intake: hostile inputs give one clear ImageError line, the format zoo gives the right pixels.

Every image is generated here (PIL/numpy, a tiny PNG writer for 16-bit and
bomb headers); no binaries are committed. All tests run with warnings as
errors: no PIL warning may reach the caller.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from edgevlm.errors import EdgeVLMError, ImageError, ImageNotFoundError, InvalidRequestError
from edgevlm.vision import images
from edgevlm.vision.images import MAX_PIXELS, LoadedImage, load_image

pytestmark = pytest.mark.filterwarnings("error")

RNG = np.random.default_rng(1234)
RGB = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # 8 wide, 6 high: orientation is visible
#: EXIF orientation -> the same transform in numpy (EXIF 2.3 tag 0x0112).
ORIENT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
          5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
          7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


# --------------------------------------------------------------------------- helpers

def pixels(img: LoadedImage) -> np.ndarray:
    return np.frombuffer(img.rgb, np.uint8).reshape(img.height, img.width, 3)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, depth: int, color: int, raw: bytes, *, extra: bytes = b"") -> bytes:
    """A PNG from raw (already filtered) scanlines: what PIL cannot write (16-bit RGB, bombs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def png16(arr: np.ndarray, color: int) -> bytes:
    """A 16-bit PNG of ``arr`` (h, w[, c]) uint16; color type 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA."""
    rows = arr.reshape(arr.shape[0], -1).astype(">u2")
    return png(arr.shape[1], arr.shape[0], 16, color, b"".join(b"\x00" + r.tobytes() for r in rows))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A real decompression bomb: 1-bit, all zero, ~110 KB declaring ``width`` x ``height``."""
    return png(width, height, 1, 0, (b"\x00" * ((width + 7) // 8 + 1)) * height)


def assert_one_clear_line(exc: BaseException) -> str:
    msg = str(exc)
    assert isinstance(exc, EdgeVLMError)
    assert "\n" not in msg and len(msg) < 400, msg
    assert not re.search(r"\b0x[0-9a-fA-F]{4,}|<_io\.|object at|Traceback|PIL\.", msg), msg
    return msg


def error_of(image, **kw) -> tuple[type, str]:
    with pytest.raises(EdgeVLMError) as info:
        load_image(image, **kw)
    return type(info.value), assert_one_clear_line(info.value)


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fails the test if any image data is decoded (header parsing is allowed)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"pixels of a {self.size} image were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --------------------------------------------------------------------------- decompression bombs

def test_png_bomb_is_refused_from_the_header(tmp_path, no_pixel_decoding):
    data = bomb_png()
    assert len(data) < 200_000
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    for image in (data, str(path), path):
        kind, msg = error_of(image)
        assert kind is ImageError
        assert "30000x30000" in msg and "900 megapixels" in msg and "144 megapixels" in msg
        assert "downscale" in msg


def test_bomb_below_pils_own_error_threshold_is_refused_by_ours(no_pixel_decoding):
    # 13000 x 12000 = 156 MP: above MAX_PIXELS, below PIL's 2 x 89 MP error (PIL only warns).
    assert MAX_PIXELS < 13000 * 12000 < 2 * Image.MAX_IMAGE_PIXELS
    kind, msg = error_of(png(13000, 12000, 1, 0, b"\x00"))
    assert kind is ImageError and "13000x12000" in msg


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.fromarray(RGB), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_jpeg_and_gif_bombs_are_refused_from_the_header(no_pixel_decoding):
    _, msg = error_of(_jpeg_with_size(60000, 50000))
    assert "60000x50000" in msg
    gif = bytearray(encode(Image.fromarray(RGB).quantize(8), "GIF"))
    gif[6:10] = struct.pack("<HH", 65000, 65000)
    assert "65000x65000" in error_of(bytes(gif))[1]


def test_pil_bomb_error_still_names_the_size(monkeypatch):
    # A caller who lowered PIL's own limit: PIL raises DecompressionBombError inside open();
    # the message must still give the declared size, not PIL's text or a traceback.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    kind, msg = error_of(encode(Image.fromarray(np.zeros((50, 60, 3), np.uint8)), "PNG"))
    assert kind is ImageError and "60x50" in msg
    # between PIL's warning and error threshold: PIL warns (an error here), we load silently
    assert load_image(encode(Image.fromarray(np.zeros((40, 30, 3), np.uint8)), "PNG")).width == 30


# --------------------------------------------------------------------------- unreadable inputs

def test_folder_says_folder(tmp_path):
    kind, msg = error_of(tmp_path)
    assert kind is ImageError and not issubclass(kind, FileNotFoundError)
    assert f"{tmp_path} is a folder, not an image file" in msg


def test_missing_file(tmp_path):
    kind, msg = error_of(tmp_path / "nope.jpg")
    assert issubclass(kind, ImageNotFoundError) and issubclass(kind, FileNotFoundError)
    assert "not found" in msg and "nope.jpg" in msg


def _truncated(fmt: str) -> bytes:
    data = encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    return data[:len(data) // 2]


HOSTILE = {
    "empty bytes": (b"", ImageError, "empty"),
    "text": (b"just some notes\nnot an image\n", ImageError, "not a readable image.*text file"),
    "html": (b"<!DOCTYPE html><html><body>404</body></html>", ImageError, "HTML page"),
    "random bytes": (RNG.bytes(4096), ImageError, "not a readable image.*PNG, JPEG"),
    "png header only": (encode(Image.fromarray(RGB), "PNG")[:30], ImageError, "PNG file but its header"),
    "truncated png": (_truncated("PNG"), ImageError, "truncated"),
    "truncated jpeg": (_truncated("JPEG"), ImageError, "truncated"),
    "truncated gif": (_truncated("GIF"), ImageError, "truncated"),
    "truncated webp": (_truncated("WEBP"), ImageError, "corrupt or cut short"),
    "eps (never opened: Ghostscript)": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
                                        ImageError, "not a readable image"),
    "data url without comma": ("data:image/png;base64", ImageError, "no ','"),
    "data url bad base64": ("data:image/png;base64,@@not*base64@@", ImageError, "base64 data is invalid"),
    "data url of text": ("data:image/png;base64," + base64.b64encode(b"hello").decode(), ImageError,
                         "data: URL image: not a readable image"),
    "http url": ("http://example.com/cat.jpg", InvalidRequestError, "does not download"),
    "https url": ("https://example.com/cat.jpg", InvalidRequestError, "does not download"),
    "s3 url": ("s3://bucket/cat.jpg", InvalidRequestError, "does not download"),
    "empty path": ("", ImageError, "path is empty"),
    "base64 passed as a path": ("iVBORw0KGgo" * 60, ImageError, "data:image/...;base64"),
    "nul in path": ("a\x00b.png", ImageError, "NUL"),
    "wrong type": (3.5, InvalidRequestError, "not float"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_input_is_one_clear_error(case):
    image, expected, pattern = HOSTILE[case]
    kind, msg = error_of(image)
    assert issubclass(kind, expected), (kind, msg)
    assert re.search(pattern, msg), msg


def test_empty_and_renamed_files(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty file (0 bytes)" in error_of(empty)[1]
    renamed = tmp_path / "notes.png"
    renamed.write_text("shopping list: eggs")
    kind, msg = error_of(renamed)
    assert kind is ImageError and msg.startswith(f"{renamed}: not a readable image")


def test_warning_triggering_images_load_silently():
    # palette PNG whose tRNS holds several alphas: PIL's convert("RGB") warns about it
    pal = Image.fromarray(RGB).quantize(8)
    data = encode(pal, "PNG", transparency=bytes(range(0, 256, 32)))
    with pytest.raises(UserWarning):
        Image.open(io.BytesIO(data)).convert("RGB")
    palette = np.asarray(pal.getpalette()[:24], np.uint8).reshape(8, 3)
    assert np.array_equal(pixels(load_image(data)), palette[np.asarray(pal)])
    # EXIF whose entry points past the end: PIL warns "Possibly corrupt EXIF data"
    bad_exif = b"MM\x00*\x00\x00\x00\x08\x00\x01" + struct.pack(">HHII", 0x010E, 2, 4000, 200) + b"\x00" * 4
    jpeg = encode(Image.fromarray(RGB), "JPEG", exif=b"Exif\x00\x00" + bad_exif)
    with pytest.raises(UserWarning):
        Image.open(io.BytesIO(jpeg)).getexif().get_ifd(0x8769)
    assert load_image(jpeg).width == 8


# --------------------------------------------------------------------------- the format zoo

def _exact_cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """Lossless encodings -> the RGB they must decode to (expected arrays built with numpy)."""
    gray = RNG.integers(0, 256, (6, 8), dtype=np.uint8)
    bits = RNG.integers(0, 2, (6, 8)).astype(bool)
    rgba = np.dstack([RGB, RNG.integers(1, 256, (6, 8), dtype=np.uint8)])
    g16 = RNG.integers(0, 65536, (6, 8), dtype=np.uint16)
    rgb16 = RNG.integers(0, 65536, (6, 8, 3), dtype=np.uint16)
    rgba16 = RNG.integers(0, 65536, (6, 8, 4), dtype=np.uint16)
    la16 = RNG.integers(0, 65536, (6, 8, 2), dtype=np.uint16)
    pal = Image.fromarray(RGB).quantize(16)
    pal_rgb = np.asarray(pal.getpalette()[:48], np.uint8).reshape(16, 3)[np.asarray(pal)]
    rep = lambda g: np.repeat(g[..., None], 3, axis=2)  # noqa: E731
    return {
        "png rgb": (encode(Image.fromarray(RGB), "PNG"), RGB),
        "png rgba (alpha dropped)": (encode(Image.fromarray(rgba), "PNG"), RGB),
        "png gray L": (encode(Image.fromarray(gray), "PNG"), rep(gray)),
        "png gray+alpha LA": (encode(Image.fromarray(np.dstack([gray, gray[::-1]])), "PNG"), rep(gray)),
        "png 1-bit": (encode(Image.fromarray(bits), "PNG"), rep(bits.astype(np.uint8) * 255)),
        "png palette": (encode(pal, "PNG"), pal_rgb),
        "png palette + transparency": (encode(pal, "PNG", transparency=3), pal_rgb),
        "png 16-bit gray I;16": (encode(Image.fromarray(g16), "PNG"), rep((g16 >> 8).astype(np.uint8))),
        "png 16-bit gray (own writer)": (png16(g16, 0), rep((g16 >> 8).astype(np.uint8))),
        "png 16-bit rgb": (png16(rgb16, 2), (rgb16 >> 8).astype(np.uint8)),
        "png 16-bit rgba": (png16(rgba16, 6), (rgba16[..., :3] >> 8).astype(np.uint8)),
        "png 16-bit gray+alpha": (png16(la16, 4), rep((la16[..., 0] >> 8).astype(np.uint8))),
        "bmp rgb": (encode(Image.fromarray(RGB), "BMP"), RGB),
        "bmp palette": (encode(pal, "BMP"), pal_rgb),
        "bmp 1-bit": (encode(Image.fromarray(bits), "BMP"), rep(bits.astype(np.uint8) * 255)),
        "tiff rgb": (encode(Image.fromarray(RGB), "TIFF"), RGB),
        "tiff rgb lzw": (encode(Image.fromarray(RGB), "TIFF", compression="tiff_lzw"), RGB),
        "tiff rgba": (encode(Image.fromarray(rgba), "TIFF"), RGB),
        "tiff 1-bit group4": (encode(Image.fromarray(bits), "TIFF", compression="group4"),
                              rep(bits.astype(np.uint8) * 255)),
        "tiff 16-bit gray": (encode(Image.fromarray(g16), "TIFF"), rep((g16 >> 8).astype(np.uint8))),
        "webp lossless": (encode(Image.fromarray(RGB), "WEBP", lossless=True), RGB),
        "webp lossless rgba": (encode(Image.fromarray(rgba), "WEBP", lossless=True, exact=True), RGB),
        "gif palette": (encode(pal, "GIF"), pal_rgb),
        "ppm": (encode(Image.fromarray(RGB), "PPM"), RGB),
        "pgm": (encode(Image.fromarray(gray), "PPM"), rep(gray)),
    }


EXACT = _exact_cases()


@pytest.mark.parametrize("case", EXACT, ids=list(EXACT))
def test_format_gives_exact_pixels(case):
    data, expected = EXACT[case]
    img = load_image(data)
    assert (img.width, img.height) == (expected.shape[1], expected.shape[0])
    np.testing.assert_array_equal(pixels(img), expected)


def test_alpha_is_dropped_not_composited():
    """Documented choice: PIL's convert("RGB") (the HF processors' semantics), not white compositing."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red under fully transparent alpha
    got = pixels(load_image(encode(Image.fromarray(rgba), "PNG")))
    assert (got == [200, 0, 0]).all()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_gives_the_first_frame(fmt):
    blocks = np.kron(RNG.integers(0, 4, (3, 4)), np.ones((2, 2), int))  # 4 colours: GIF keeps them exact
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 250]], np.uint8)
    first, second = colours[blocks], colours[(blocks + 1) % 4]
    frames = [Image.fromarray(first), Image.fromarray(second)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    np.testing.assert_array_equal(pixels(load_image(data)), first)


def _with_orientation(im: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    return encode(im, fmt, exif=exif.tobytes(), **extra)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(fmt, orientation):
    data = _with_orientation(Image.fromarray(RGB), fmt, orientation)
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == orientation
    # JPEG is lossy: rotate what the decoder gives without orientation (PIL's TIFF plugin
    # applies the orientation while loading: it must not be rotated twice)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) if fmt == "JPEG" else RGB
    np.testing.assert_array_equal(pixels(load_image(data)), ORIENT[orientation](stored))


def test_cmyk_jpeg():
    cmyk = Image.fromarray(RGB).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert np.abs(pixels(load_image(data)).astype(int) - RGB).max() <= 4


def test_mpo_gives_the_first_picture():
    """Phone cameras write MPO (JPEG + extra pictures); it is a JPEG to draft and decode."""
    first = Image.fromarray(np.kron(RGB, np.ones((8, 8, 1), np.uint8)))
    data = encode(first, "MPO", save_all=True, append_images=[first.rotate(90)], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    got = pixels(load_image(data))
    np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    error = lambda im: np.abs(got.astype(int) - np.asarray(im)).mean()  # noqa: E731
    assert error(first) < 10 and error(first.rotate(90)) > 3 * error(first)


def test_rgb_jpeg_matches_the_decoder():
    smooth = np.dstack(np.mgrid[0:48, 0:64] * 3 + [[[0]], [[10]]])[..., [0, 1, 0]].astype(np.uint8)
    data = encode(Image.fromarray(smooth), "JPEG", quality=90)
    got = pixels(load_image(data))
    np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert np.abs(got.astype(int) - smooth).mean() < 2


# --------------------------------------------------------------------------- input kinds and identity

def test_every_input_kind_gives_the_same_image(tmp_path):
    data = encode(Image.fromarray(RGB), "PNG")
    path = tmp_path / "my pic.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    inputs = [data, bytearray(data), memoryview(data), str(path), path, path.as_uri(),
              "file://" + str(path), f"data:image/png;base64,{b64}",
              "data:image/png;base64," + "\n".join(textwrap.wrap(b64, 60)),  # MIME line breaks
              "data:image/png;base64," + base64.urlsafe_b64encode(data).decode().rstrip("="),
              "data:image/png," + "".join(f"%{b:02X}" for b in data),  # RFC 2397 percent-encoded
              Image.open(io.BytesIO(data)), Image.fromarray(RGB)]
    digests = {load_image(x).digest for x in inputs}
    assert len(digests) == 1


def test_digest_formula_is_unchanged():
    """sha256(f"{w}x{h}:" + RGB bytes) of exif_transpose + convert("RGB"): existing caches stay valid."""
    for data in (_with_orientation(Image.fromarray(RGB).quantize(12), "PNG", 6), EXACT["png rgba (alpha dropped)"][0],
                 _with_orientation(Image.fromarray(RGB), "JPEG", 3)):
        old = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        want = hashlib.sha256(f"{old.width}x{old.height}:".encode() + old.tobytes()).hexdigest()
        assert load_image(data).digest == want


def test_caller_pil_image_is_not_modified():
    src = Image.open(io.BytesIO(encode(Image.fromarray(RNG.integers(0, 256, (300, 400, 3), np.uint8)), "JPEG")))
    got = load_image(src, max_side=64)
    assert (got.width, got.height) == (64, 48) and src.size == (400, 300)


# --------------------------------------------------------------------------- downscaling

def _gradient(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.dstack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256]).astype(np.uint8)
    return np.clip(base.astype(int) + RNG.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16"])
def test_downscale_matches_whole_image_bicubic(mode):
    """Band-wise convert + resize == convert("RGB").resize(BICUBIC) of the whole image."""
    arr = _gradient(700, 530)
    im = {"RGBA": lambda: Image.fromarray(np.dstack([arr, arr[..., 0]])),
          "I;16": lambda: Image.fromarray(arr[..., 0].astype(np.uint16) * 257)}.get(
        mode, lambda: Image.fromarray(arr).convert(mode))()
    got = load_image(encode(im, "PNG"), max_side=256)
    assert (got.width, got.height) == (256, 194)
    base = Image.fromarray(arr[..., 0]).convert("RGB") if mode == "I;16" else im.convert("RGB")
    want = np.asarray(base.resize((256, 194), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(pixels(got).astype(int) - want).max() <= 1


def test_downscale_then_orientation():
    arr = _gradient(640, 480)
    data = _with_orientation(Image.fromarray(arr), "PNG", 6)
    got = load_image(data, max_side=200)
    want = ORIENT[6](np.asarray(Image.fromarray(arr).resize((200, 150), Image.Resampling.BICUBIC)))
    assert (got.width, got.height) == (150, 200)
    assert np.abs(pixels(got).astype(int) - want).max() <= 1


def test_large_jpeg_is_dct_downscaled():
    arr = _gradient(1600, 1200)
    data = encode(Image.fromarray(arr), "JPEG", quality=92)
    got = load_image(data, max_side=300)  # draft: 1/4 scale decode (400x300 >= 300x225), then bicubic
    assert (got.width, got.height) == (300, 225)
    ref = Image.open(io.BytesIO(data))
    ref.draft("RGB", (300, 225))
    assert ref.size == (400, 300)
    want = np.asarray(ref.convert("RGB").resize((300, 225), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(pixels(got).astype(int) - want).max() <= 1
    full = np.asarray(Image.fromarray(arr).resize((300, 225), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(pixels(got).astype(int) - full).mean() < 3  # close to the full-resolution result


# --------------------------------------------------------------------------- peak memory, real processes

# ru_maxrss of a child forked from this (large) pytest process starts at the parent's RSS
# (Linux keeps the pre-exec high-water mark), so on Linux the mm's own VmHWM is read.
MEASURE = """
import resource, sys
from edgevlm.vision.images import load_image
img = load_image(sys.argv[1])
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    with open("/proc/self/status") as status:
        peak_kb = int(status.read().split("VmHWM:")[1].split()[0])
except (OSError, IndexError):
    pass
print(img.width, img.height, peak_kb // 1024)
"""

MAKE = """
import sys, numpy as np
from PIL import Image
w, h = int(sys.argv[2]), int(sys.argv[3])
yy, xx = np.mgrid[0:h // 8, 0:w // 8]
small = np.dstack([xx % 256, yy % 256, (xx * 3 + yy) % 256]).astype(np.uint8)
Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(sys.argv[1])
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error", "-c", code, *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name,width,height,limit_mb", [
    ("photo.jpg", 4000, 3072, 200),   # measured ~125 MB (was ~140): decode at full size, no resize
    ("huge.jpg", 12000, 9000, 260),   # measured ~190 MB (was ~245): DCT 1/2-scale decode
    ("big.png", 8000, 6000, 360),     # measured ~275 MB (was ~390): one full decode (4 B/px) + result
])
def test_peak_rss_of_large_images(tmp_path, name, width, height, limit_mb):
    path = tmp_path / name
    made = _python(MAKE, path, width, height)
    assert made.returncode == 0, made.stderr
    proc = _python(MEASURE, path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    w, h, peak_mb = map(int, proc.stdout.split())
    assert max(w, h) == min(max(width, height), images.MAX_SIDE)
    assert peak_mb < limit_mb, f"{name}: peak RSS {peak_mb} MB"


CLI_LIKE = """
import sys
from edgevlm.errors import EdgeVLMError
from edgevlm.vision.images import load_image
try:
    img = load_image(sys.argv[1])
except EdgeVLMError as exc:
    print(f"edgevlm: error: {exc}", file=sys.stderr)
    sys.exit(2)
print(img.width, img.height)
"""


def test_real_process_reports_one_line_and_no_warnings(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    proc = _python(CLI_LIKE, bomb)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "30000x30000" in lines[0], proc.stderr
    noisy = tmp_path / "noisy.png"  # palette + byte transparency: PIL's convert warns
    noisy.write_bytes(encode(Image.fromarray(RGB).quantize(4), "PNG", transparency=b"\x00\x80\xff\x10"))
    proc = _python(CLI_LIKE, noisy)
    assert (proc.returncode, proc.stdout.split(), proc.stderr) == (0, ["8", "6"], "")
