"""``edgevlm doctor``: the table, --json, and an unwritable cache folder (CliRunner and a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from edgevlm.cli.main import cli

KEYS = ["versions", "build", "devices", "cpu", "kernels", "cache", "self_test", "healthy", "problems"]


def test_doctor_table_on_this_machine():
    result = CliRunner().invoke(cli, ["doctor", "--threads", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for heading in ("versions", "build", "devices", "cpu", "kernels", "cache", "self-test"):
        assert f"\n{heading}\n" in f"\n{result.output}"
    assert "llama-cpp-python    0.3.36" in result.output and "GFLOP/s" in result.output
    assert result.output.rstrip().endswith("healthy") and "problem:" not in result.output


def test_doctor_json_through_a_real_subprocess():
    proc = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "doctor", "--json", "--seconds", "0.2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"llama.cpp logs leaked to stderr: {proc.stderr[:300]}"
    data = json.loads(proc.stdout)
    assert [k for k in data if k in KEYS] == KEYS and data["healthy"] is True and data["problems"] == []
    assert data["versions"]["llama_cpp_python"] == "0.3.36"
    assert data["kernels"]["ok"] and data["cache"]["writable"] and data["self_test"]["ok"]
    assert data["cache"]["path"] == os.environ["EDGEVLM_CACHE_DIR"]
    assert any(d["kind"] == "cpu" for d in data["devices"])


def test_unwritable_cache_fails_with_one_line_and_the_full_report(tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("a file, so nothing can be created below it")
    env = dict(os.environ, EDGEVLM_CACHE_DIR=str(blocker / "cache"))
    proc = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "doctor", "--json", "--seconds", "0.2"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"edgevlm: error: the cache folder {blocker / 'cache'} cannot be created")
    data = json.loads(proc.stdout)
    assert data["healthy"] is False and not data["cache"]["writable"] and len(data["problems"]) == 1
    assert data["self_test"]["ok"]  # the rest of the report is still there

    table = CliRunner().invoke(cli, ["doctor", "--seconds", "0"], env={"EDGEVLM_CACHE_DIR": str(blocker / "cache")})
    assert table.exit_code == 1 and "NOT healthy: 1 problem(s)" in table.stdout
    assert table.stderr.count("\n") == 1 and table.stderr.startswith("edgevlm: error: the cache folder")


def test_doctor_help():
    result = CliRunner().invoke(cli, ["doctor", "--help"])
    assert result.exit_code == 0 and "--json" in result.output and "without loading a model" in result.output
    assert "--seconds" in result.output and "--device" in result.output
