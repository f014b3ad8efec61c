"""`edgevlm chat` on hostile images, as a person runs it (a real process): one line, exit 2, no traceback;
and a 4000x3072 photo answered within bounded memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.vision.test_intake import bomb_png


def _chat(model: Path, image: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "chat", "--model", str(model),
                           "--image", str(image), "-p", "What is it?", "--max-tokens", "2",
                           "--threads", "2", "--no-cache", *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["bomb", "folder", "empty", "text"])
def test_bad_image_is_one_line(siglip_f32, tmp_path, case):
    path = tmp_path / "painting.png"
    if case == "bomb":
        path.write_bytes(bomb_png())
    elif case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("not a picture at all")
    proc = _chat(siglip_f32, path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and " at 0x" not in proc.stderr and "Warning" not in proc.stderr
    expected = {"bomb": "30000x30000", "folder": "folder", "empty": "empty", "text": "not"}[case]
    assert expected in lines[0]
    assert proc.stdout == ""


def test_large_photo_is_answered_in_bounded_memory(siglip_f32, tmp_path):
    """A 4000x3072 JPEG through the whole CLI; peak RSS read from the process itself (VmHWM)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((4000, 3072), Image.Resampling.BILINEAR)
    path = tmp_path / "photo.jpg"
    photo.save(path, quality=90)
    code = ("import sys, runpy\n"
            "sys.argv = ['edgevlm'] + sys.argv[1:]\n"
            "code = 0\n"
            "try:\n    runpy.run_module('edgevlm.cli.main', run_name='__main__')\n"
            "except SystemExit as exc:\n"
            "    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print('PEAK_KB', hwm.split()[1], file=sys.stderr)\n"
            "sys.exit(code)\n")  # the CLI's exit status, after the peak is read
    proc = subprocess.run([sys.executable, "-c", code, "chat", "--model", str(siglip_f32), "--image", str(path),
                           "-p", "Describe it.", "--max-tokens", "2", "--threads", "2", "--no-cache"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stderr.split("PEAK_KB")[1].split()[0]) / 1024
    print(f"edgevlm chat on a 4000x3072 JPEG: peak RSS {peak_mb:.0f} MB")
    assert proc.stdout.strip(), "no answer"
    assert peak_mb < 400
