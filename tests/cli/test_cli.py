"""The command line: chat, inspect, bench, convert, errors (CliRunner and a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgevlm
import edgevlm.cache
from edgevlm.cli.chat import ChatSession
from edgevlm.cli.main import cli


def _run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def test_version_and_help():
    result = _run("--version")
    assert result.exit_code == 0 and edgevlm.__version__ in result.output
    for cmd in ("chat", "convert", "inspect", "bench"):
        res = _run(cmd, "--help")
        assert res.exit_code == 0 and "Usage" in res.output


def test_convert_help_shows_each_family_option_with_its_family():
    """The converter registry's options (Converter.options) are `convert` options, each named with its users."""
    import re

    from edgevlm.convert import family_options

    options = family_options()
    flags = {option.flag: users for option, users in options}
    assert {"--vision-tower", "--adapter-heads"} <= set(flags) and "OmniFusion" in flags["--vision-tower"]
    result = _run("convert", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # click wraps the help text
    for option, users in options:
        assert re.search(rf"{re.escape(option.flag)} [A-Z ]+ {re.escape(', '.join(users))}: ", text), (
            f"{option.flag} is not shown with {', '.join(users)} in `edgevlm convert --help`")


def test_chat_one_shot_streams_an_answer(siglip_f32, painting):
    res = _run("chat", "--model", str(siglip_f32), "--image", str(painting), "-p", "What genre?",
               "--max-tokens", "5", "--temperature", "0", "--threads", "2")
    assert res.exit_code == 0, res.output
    assert res.output.endswith("\n")


def test_chat_repl_multi_turn_commands(siglip_f32, painting):
    script = f"/image {painting}\nDescribe it.\nMore?\n/reset\n/help\nHello\n/quit\n"
    res = _run("chat", "--model", str(siglip_f32), "--max-tokens", "3", "--temperature", "0",
               "--threads", "2", input=script)
    assert res.exit_code == 0, res.output


def test_chat_session_keeps_history(siglip_vlm, painting):
    import io

    session = ChatSession(siglip_vlm, system="You are terse.", sampling={"max_tokens": 3, "temperature": 0})
    session.attach([str(painting)])
    session.ask("First?", out=io.StringIO())
    calls = siglip_vlm.encoder_calls
    session.ask("Second?", out=io.StringIO())
    roles = [m["role"] for m in session.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert siglip_vlm.encoder_calls == calls
    session.reset()
    assert [m["role"] for m in session.messages] == ["system"]


def test_chat_session_prepares_attached_images_while_the_question_is_typed(siglip_vlm, painting, square_image):
    import io

    siglip_vlm.reset()
    session = ChatSession(siglip_vlm, system=None, sampling={"max_tokens": 3, "temperature": 0}, prepare=True)
    session.attach([str(painting)])
    assert session.preparation is not None
    session.preparation.wait()
    reply = session.ask("What genre?", out=io.StringIO())
    asked = siglip_vlm.last_prefill
    assert asked.images_encoded == 0 and asked.images_reused == 1, asked
    assert asked.evaluated_positions <= len(siglip_vlm.tokenize("What genre?")) + 12, asked
    siglip_vlm.reset()
    fresh = siglip_vlm.chat([{"role": "user", "content": [{"type": "image", "image": str(painting)},
                                                          {"type": "text", "text": "What genre?"}]}],
                            max_tokens=3, temperature=0)
    assert reply == fresh.text.strip()
    session.attach([str(square_image(40, seed=5))])  # a follow-up image: prepared after the history
    session.preparation.wait()
    session.ask("And this?", out=io.StringIO())
    assert siglip_vlm.last_prefill.images_encoded == 0 and siglip_vlm.last_prefill.images_reused == 2
    session.attach([str(painting)])
    last = session.preparation
    session.reset()  # the preparation is cancelled; nothing is left pending
    session.close()
    assert session.pending == [] and last.cancel.is_set() and not last.thread.is_alive()


def test_ctrl_c_during_an_answer_stops_its_prompt_read_in_the_worker(siglip_vlm, painting, monkeypatch):
    """The answer is read in a worker thread, so Ctrl-C (delivered to the main thread) is not held
    back by a llama.cpp call: here it arrives while the worker decodes the prompt; the stream's
    cancel event stops that decode, the turn is dropped, and the next question answers as usual."""
    import io
    import signal

    from edgevlm.llm import LlamaContext

    siglip_vlm.reset()
    session = ChatSession(siglip_vlm, system=None, sampling={"max_tokens": 3, "temperature": 0})
    session.attach([str(painting)])
    decoding_threads, real_run = [], LlamaContext._run

    def run_after_ctrl_c(self, batch):
        decoding_threads.append(threading.current_thread().name)
        if len(decoding_threads) == 1:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            threading.Event().wait(0.3)  # the main thread handles it meanwhile, and cancels
        return real_run(self, batch)

    monkeypatch.setattr(LlamaContext, "_run", run_after_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        session.ask("What genre?", out=io.StringIO())
    monkeypatch.undo()
    assert decoding_threads == ["edgevlm-answer"], decoding_threads  # stopped inside the first decode
    assert siglip_vlm.last_prefill.evaluated_positions == 0 and session.messages == []
    reply = session.ask("What genre?", out=io.StringIO())
    siglip_vlm.reset()
    fresh = siglip_vlm.chat([{"role": "user", "content": [{"type": "image", "image": str(painting)},
                                                          {"type": "text", "text": "What genre?"}]}],
                            max_tokens=3, temperature=0)
    assert reply == fresh.text.strip()


def test_chat_quits_at_once_while_preparing(siglip_f32, painting):
    res = _run("chat", "--model", str(siglip_f32), "--image", str(painting), "--threads", "2", input="/quit\n")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output


def test_inspect_reports_both_files(siglip_f32):
    files = sorted(str(p) for p in siglip_f32.glob("*.gguf"))
    res = _run("inspect", "--json", *files)
    assert res.exit_code == 0, res.output
    reports = json.loads(res.output)
    roles = sorted(r["role"] for r in reports)
    assert roles == ["language model", "vision projector"]
    llm = next(r for r in reports if r["role"] == "language model")
    assert llm["architecture"] == "llama" and llm["hyperparameters"]["embedding_length"] == 256
    text = _run("inspect", *files).output
    assert "loadable by" in text


def test_bench_json(siglip_f32, painting):
    res = _run("bench", "--model", str(siglip_f32), "--image", str(painting), "--json",
               "--max-tokens", "4", "--threads", "2")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    for key in ("model_load_ms", "image_encode_ms", "prompt_tokens", "prefill_tokens_per_s",
                "time_to_first_token_ms", "decode_tokens_per_s", "follow_up_time_to_first_token_ms",
                "peak_rss_mb"):
        assert key in report, key
    # the process's first request and a second, different one (another image: encoded again), before the
    # image figures' encodes (in-process here, so the ratio itself is not checked)
    assert report["first_request_ttft_ms"] > 0 and report["second_request_ttft_ms"] > 0
    first, second = report["first_request_ttft_ms"], report["second_request_ttft_ms"]
    # the ratio is of the unrounded times; each time is rounded to 0.1 ms (a few ms on this model)
    rounding = first / second * (0.05 / first + 0.05 / second)
    assert report["first_to_second_ttft_ratio"] == pytest.approx(first / second, abs=0.005 + rounding)
    assert report["follow_up_images_encoded"] == 0
    assert report["follow_up_evaluated_tokens"] < report["follow_up_prompt_tokens"]
    assert report["follow_up_reused_positions"] == (report["follow_up_prompt_tokens"]
                                                    - report["follow_up_evaluated_tokens"])
    assert report["follow_up_saved_ms_estimate"] > 0
    # a fresh process asking the follow-up about the same image restores the image prefix
    assert report["restart_snapshot_restored"] and report["restart_images_encoded"] == 0
    assert report["restart_reused_positions"] > report["image_tokens"]
    assert not list((edgevlm.cache.cache_dir()).rglob("*.kv")), "bench wrote into the user's cache"


def test_bench_compare_smoke(siglip_f32, painting):
    # one thread: ggml's spinning thread barriers crawl on a busy 2-core machine
    res = _run("bench", "--model", str(siglip_f32), "--image", str(painting), "--json", "--max-tokens", "2",
               "--threads", "1", "--compare", "llama-cpp-python", "--batch-size", "2", "--prefix-tokens", "40",
               "--restart-rounds", "1")
    assert res.exit_code == 0, res.output
    cmp = json.loads(res.output)["compare"]
    assert cmp["peer"].startswith("llama-cpp-python") and cmp["max_tokens"] == 2
    conv = cmp["conversation"]
    for turn in ("turn1_ttft_ms", "turn2_ttft_ms"):
        assert conv[turn]["edgevlm"] > 0 and conv[turn]["peer"] > 0 and conv[turn]["ratio"] > 0
    assert conv["edgevlm_turn2_images_encoded"] == 0 and conv["edgevlm_turn2_reused_positions"] > 16
    after = conv["turn1_positions_after"]  # both engines saw the same prompt (within template spacing)
    assert abs(after["edgevlm"] - after["peer"]) <= 4, after
    batch = cmp["batch"]
    assert batch["images"] == 2 and batch["prefix_tokens"] >= 40 and batch["peer_total_ms"] > 0
    assert batch["edgevlm_reused_positions"] >= batch["prefix_tokens"]  # the second image reused the prefix
    restart = cmp["restart"]
    assert restart["restart_snapshot_restored"] and restart["restart_images_encoded"] == 0
    assert restart["restart_evaluated_positions"] < batch["prompt_positions"]


def test_convert_command(llava_siglip_checkpoint, tmp_path):
    res = _run("convert", str(llava_siglip_checkpoint), str(tmp_path / "out"), "--quant", "q8_0")
    assert res.exit_code == 0, res.output
    assert "LLM" in res.output and "projector" in res.output
    assert len(list((tmp_path / "out").glob("*.gguf"))) == 2


def test_convert_omnifusion_command(omnifusion_checkpoint, tmp_path):
    release, tower = omnifusion_checkpoint
    res = _run("convert", str(release), str(tmp_path / "out"), "--vision-tower", str(tower),
               "--quant", "f16", "--vision-type", "f32")
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "out").glob("*.gguf"))
    assert names == ["mmproj-omnimistral-v1_1-f32.gguf", "omnimistral-v1_1-F16.gguf"]


def test_convert_omnifusion_error_is_one_line(omnifusion_checkpoint, tmp_path):
    release, _ = omnifusion_checkpoint
    res = CliRunner().invoke(cli, ["convert", str(release), str(tmp_path / "out")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error:"), res.output
    assert "--vision-tower" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [
    (["chat", "--model", "/nonexistent/model", "-p", "hi"], "model not found"),
    (["inspect", "/nonexistent.gguf"], "not found"),
    (["convert", "/nonexistent/ckpt", "/tmp/out-x"], "not"),
])
def test_errors_are_one_line_and_nonzero(args, needle):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error:"), res.output
    assert needle in lines[0].lower()
    assert "Traceback" not in res.output


def test_bad_image_in_cli_is_one_line(siglip_f32, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00" * 50)
    res = CliRunner().invoke(cli, ["chat", "--model", str(siglip_f32), "--image", str(bad), "-p", "x"])
    assert res.exit_code != 0 and "not a readable image" in res.output


def test_real_subprocess(siglip_f32, painting, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "chat", "--model", str(siglip_f32),
                           "--image", str(painting), "-p", "Genre?", "--max-tokens", "3",
                           "--temperature", "0", "--threads", "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"llama.cpp logs leaked to stderr: {proc.stderr[:300]}"
    bad = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "inspect", str(tmp_path / "no.gguf")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_flash_attention_flags_reach_the_load(siglip_f32, painting):
    """--flash-attn / --no-flash-attn are edgevlm.load's flash_attn; a quantised cache without it is one line."""
    from edgevlm.cli.options import load_kwargs

    assert load_kwargs({"mmproj": None, "quant": None, "n_ctx": None, "n_threads": None, "n_gpu_layers": 0,
                        "kv_type": "f16", "no_cache": True, "flash_attn": True})["flash_attn"] is True
    res = _run("-v", "chat", "--model", str(siglip_f32), "--image", str(painting), "-p", "hi", "--max-tokens", "1",
               "--threads", "2", "--ctx", "512", "--flash-attn")
    assert res.exit_code == 0, res.output
    assert any("flash_attn" in line and "enabled" in line for line in res.output.splitlines())
    res = _run("chat", "--model", str(siglip_f32), "--image", str(painting), "-p", "hi", "--max-tokens", "1",
               "--kv-type", "q8_0", "--no-flash-attn")
    assert res.exit_code == 2 and "needs flash attention" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
