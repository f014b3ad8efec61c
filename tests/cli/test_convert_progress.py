"""`edgevlm convert` progress through a real process: one bar on a terminal, steps when piped, tensors with -v.

Q8_0 output, so llama.cpp's quantiser runs (and logs a line per tensor, which
must not reach the terminal unless --verbose).
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

TENSOR_LINE = "[1/"                 # edgevlm's own per-tensor lines: "[1/21] token_embd.weight F32 [384, 256]"
QUANTISER_LINE = "converting to q8_0"  # llama.cpp's quantiser, once per matrix
LOADER_LINE = "llama_model_loader"


def _convert_cmd(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgevlm.cli.main", "convert", str(source), str(out), "--quant", "q8_0", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="100")


def test_piped_convert_prints_steps_but_no_tensor_lines_and_no_bar(llava_siglip_checkpoint, tmp_path):
    proc = subprocess.run(_convert_cmd(llava_siglip_checkpoint, tmp_path / "out"), capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "writing" in proc.stderr and "quantising to Q8_0" in proc.stderr
    for leaked in (TENSOR_LINE, QUANTISER_LINE, LOADER_LINE, "blk.0.", "\r", "%|"):
        assert leaked not in proc.stderr, (leaked, proc.stderr[:500])
    assert len(proc.stderr.splitlines()) <= 8, proc.stderr
    assert "LLM" in proc.stdout and "projector" in proc.stdout


def test_verbose_convert_lists_every_tensor_and_llama_cpp_log(llava_siglip_checkpoint, tmp_path):
    proc = subprocess.run(_convert_cmd(llava_siglip_checkpoint, tmp_path / "out", "--verbose"), capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert TENSOR_LINE in proc.stderr and "token_embd.weight" in proc.stderr
    assert QUANTISER_LINE in proc.stderr  # llama.cpp's own lines, through the edgevlm.llama logger
    assert "%|" not in proc.stderr


def _read_pty(master: int, proc: subprocess.Popen, deadline: float) -> bytes:
    chunks = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks)


def test_convert_on_a_terminal_shows_one_progress_bar(llava_siglip_checkpoint, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(_convert_cmd(llava_siglip_checkpoint, tmp_path / "out"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave, env=_env())
        os.close(slave)
        slave = -1
        terminal = _read_pty(master, proc, time.monotonic() + 300).decode("utf-8", errors="replace")
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, terminal
    frames = terminal.replace("\r\n", "\n").replace("\r", "\n").splitlines()
    bars = [f for f in frames if "%|" in f]
    assert bars, terminal
    final = bars[-1]
    assert "100%|" in final and "projector" in final and "tensors]" in final, final
    assert any("quantising to Q8_0" in f and "tensors" in f for f in bars), "the quantiser's pass is not on the bar"
    assert any("<" in f and "/s" in f for f in bars), "no ETA / rate"  # tqdm's [elapsed<remaining, rate]
    for leaked in (TENSOR_LINE, QUANTISER_LINE, LOADER_LINE):
        assert leaked not in terminal, (leaked, terminal[:500])
    assert b"LLM" in stdout


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_progress_reports_add_up_to_the_announced_work(llava_siglip_checkpoint, tmp_path, quant):
    from edgevlm.convert import convert

    class Recorder:
        def __init__(self) -> None:
            self.total: tuple[int, int] | None = None
            self.done: list = []
            self.steps: list[str] = []

        def step(self, message: str) -> None:
            self.steps.append(message)

        def begin(self, tensors: int, nbytes: int) -> None:
            assert self.total is None and not self.done
            self.total = (tensors, nbytes)

        def tensor(self, done) -> None:
            self.done.append(done)

    rec = Recorder()
    convert(llava_siglip_checkpoint, tmp_path / "out", quant=quant, progress=rec)
    assert rec.total == (len(rec.done), sum(d.nbytes for d in rec.done))
    stages = list(dict.fromkeys(d.stage for d in rec.done))
    assert stages == (["LLM", "quantising to Q8_0", "projector"] if quant == "q8_0" else ["LLM", "projector"])
    for stage in stages:
        mine = [d for d in rec.done if d.stage == stage]
        assert [d.index for d in mine] == list(range(1, len(mine) + 1)) and {d.count for d in mine} == {len(mine)}
    if quant == "q8_0":  # the quantiser's pass, read from llama.cpp's log, covers every LLM tensor once
        llm = {d.name for d in rec.done if d.stage == "LLM"}
        assert sorted(d.name for d in rec.done if d.quantising) == sorted(llm)


def test_a_line_callback_still_gets_a_line_per_tensor(llava_siglip_checkpoint, tmp_path):
    from edgevlm.convert import convert

    lines: list[str] = []
    convert(llava_siglip_checkpoint, tmp_path / "out", quant="f16", progress=lines.append)
    assert any(line.startswith("writing ") for line in lines)
    assert any(line.startswith("[1/") for line in lines)
    assert any(line.startswith("[") and "token_embd.weight" in line for line in lines)
