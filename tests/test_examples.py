"""examples/ask_about_image.py runs as a user would (a real subprocess) and shows the cache at work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ask_about_image.py"


def test_ask_about_image_encodes_the_image_once(siglip_f32, painting):
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(siglip_f32), str(painting), "Genre?", "Colours?"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    status = [line for line in proc.stdout.splitlines() if "positions evaluated" in line]
    assert len(status) == 2
    assert "1 image(s) encoded" in status[0] and "0 image(s) encoded" in status[1]
    assert proc.stderr == ""
