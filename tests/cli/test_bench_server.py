"""``edgevlm bench --server``: the conversation and the batch through ``edgevlm serve`` and llama-cpp-python's server."""

from __future__ import annotations

import importlib.util
import json

from click.testing import CliRunner

from edgevlm.cli.main import cli


def test_bench_server_measures_http_beside_in_process(siglip_f32, painting):
    res = CliRunner().invoke(cli, ["bench", "--model", str(siglip_f32), "--image", str(painting), "--json",
                                   "--max-tokens", "3", "--threads", "1", "--restart-rounds", "1", "--server",
                                   "--batch-size", "2", "--prefix-tokens", "40"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    server = json.loads(res.output)["server"]
    conversation, batch = server["conversation"], server["batch"]
    peer = importlib.util.find_spec("fastapi") is not None and importlib.util.find_spec("starlette_context")
    names = {"in_process", "edgevlm_http"} | ({"peer_http"} if peer else set())
    for turn in (1, 2):
        assert set(conversation[f"turn{turn}_ttft_ms"]) == names
        assert all(v > 0 for v in conversation[f"turn{turn}_ttft_ms"].values())
    # the HTTP follow-up reused the first turn (image included) from the server's KV cache
    assert conversation["edgevlm_http_turn2_cached_tokens"] > 16
    assert batch["images"] == 2 and batch["edgevlm_http_requests_per_s"] > 0
    if peer:
        assert server["peer"].startswith("llama-cpp-python") and batch["peer_http_requests_per_s"] > 0
        assert conversation["turn2_ratio_peer_over_edgevlm_http"] > 0
    else:
        assert server["peer"].startswith("not measured")


def test_bench_shows_its_stages_on_a_terminal_only(siglip_f32, painting):
    import subprocess
    import sys

    from tests.helpers import run_with_stderr_on_a_terminal

    args = [sys.executable, "-m", "edgevlm.cli.main", "bench", "--model", str(siglip_f32), "--image", str(painting),
            "--json", "--max-tokens", "2", "--threads", "1", "--restart-rounds", "1"]
    code, out, seen = run_with_stderr_on_a_terminal(args)
    assert code == 0 and json.loads(out)["generated_tokens"] >= 0
    assert b"bench: conversation" in seen and b"stages" in seen
    piped = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and piped.stderr == ""  # nothing extra when piped
