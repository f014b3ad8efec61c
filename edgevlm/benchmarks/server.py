"""``edgevlm bench --server``: the same conversation through HTTP, against llama-cpp-python's server.

Three ways to answer the same requests, measured in one run, on the same
GGUF pair, threads and context size, with greedy decoding:

* **in-process**: :meth:`edgevlm.VLM.stream` in the bench process;
* **edgevlm serve**: a server process, streamed over HTTP (server-sent
  events) from a loopback port;
* **peer**: llama-cpp-python's own OpenAI server (``python -m
  llama_cpp.server --chat_format mtmd``, its multimodal chat handler), when
  its ``server`` extra is installed; otherwise the report says why it is absent.

Workloads: a two-turn conversation about one image (time to the first
content token of each turn; requests interleaved between the servers so
background load hits both alike) and a batch of N different images, each
asked one question after a shared instruction prefix (requests per second).
Both servers get one warm-up request first.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgevlm.api import VLM
from edgevlm.benchmarks.compare import instruction_prefix, make_images, to_peer_messages
from edgevlm.benchmarks.conversation import follow
from edgevlm.benchmarks.probe import image_question, timed_turn
from edgevlm.errors import RuntimeFailure

STARTUP_TIMEOUT_S = 300


def run_server_bench(vlm: VLM, serve_args: list[str], *, image: str | None, prompt: str, follow_up: str,
                     max_tokens: int, batch_size: int = 20, prefix_tokens: int = 200) -> dict[str, Any]:
    """Measure the conversation and the batch in-process, through ``edgevlm serve`` and through the peer.

    Args:
        vlm: the model loaded in this process.
        serve_args: ``edgevlm serve`` options that load the same model the same way.
        image: the conversation's image (None: a generated one).
        prompt, follow_up: the conversation's questions.
        max_tokens: reply length limit of every request.
        batch_size: images in the batch.
        prefix_tokens: approximate length of the batch's shared instruction prefix.
    """
    with tempfile.TemporaryDirectory(prefix="edgevlm-server-bench-") as tmp:
        images = make_images(batch_size + 2, Path(tmp))
        image = image or images[-1]
        with _edgevlm_server(serve_args, Path(tmp) / "cache") as ours, _peer_server(vlm) as (peer, peer_note):
            servers = {"edgevlm_http": ours, **({"peer_http": peer} if peer else {})}
            for base in servers.values():
                completion(base, image_question(images[-2], "Warm up."), max_tokens)
            with vlm.isolated_caches():
                timed_turn(vlm, image_question(images[-2], "Warm up."), 1)
                report = {"peer": peer_note, "max_tokens": max_tokens,
                          "conversation": _conversation(vlm, servers, image, prompt, follow_up, max_tokens)}
                prefix = instruction_prefix(vlm, prefix_tokens)
                report["batch"] = _batch(servers, images[:batch_size], prefix, max_tokens)
    return report


def _conversation(vlm: VLM, servers: dict[str, str], image: str, prompt: str, follow_up: str,
                  max_tokens: int) -> dict[str, Any]:
    first = image_question(image, prompt)
    turns: dict[str, list[dict[str, Any]]] = {"in_process": [timed_turn(vlm, first, max_tokens)]}
    for name, base in servers.items():
        turns[name] = [completion(base, first, max_tokens)]
    for name, done in turns.items():
        second = follow(first, done[0]["text"], follow_up)
        done.append(timed_turn(vlm, second, max_tokens) if name == "in_process"
                    else completion(servers[name], second, max_tokens))
    report: dict[str, Any] = {}
    for turn in (1, 2):
        report[f"turn{turn}_ttft_ms"] = {name: round(done[turn - 1]["ttft_ms"], 1) for name, done in turns.items()}
    second = report["turn2_ttft_ms"]
    report["turn2_http_over_in_process"] = round(second["edgevlm_http"] / second["in_process"], 2)
    report["edgevlm_http_turn2_cached_tokens"] = turns["edgevlm_http"][1]["cached_tokens"]
    if "peer_http" in second:
        report["turn2_ratio_peer_over_edgevlm_http"] = round(second["peer_http"] / second["edgevlm_http"], 2)
    return report


def _batch(servers: dict[str, str], images: list[str], prefix: str, max_tokens: int) -> dict[str, Any]:
    totals = {name: 0.0 for name in servers}
    for img in images:
        messages = image_question(img, "Describe this image.", prefix)
        for name, base in servers.items():
            totals[name] += completion(base, messages, max_tokens)["total_ms"]
    report: dict[str, Any] = {"images": len(images)}
    for name, total in totals.items():
        report[f"{name}_requests_per_s"] = round(len(images) / (total / 1e3), 3)
    if "peer_http" in totals:
        report["ratio"] = round(totals["peer_http"] / totals["edgevlm_http"], 2)
    return report


def completion(base: str, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """One greedy streamed chat completion over HTTP: text, ttft_ms (first content), total_ms, cached_tokens.

    Raises:
        RuntimeFailure: the server answered with an error status.
    """
    url = urllib.parse.urlsplit(base)
    body = {"model": "bench", "messages": http_messages(messages), "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", f"{url.path}/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeFailure(f"{base} answered {response.status}: {response.read()[:300]!r}")
    first, pieces, cached = None, [], 0
    for chunk in _sse_data(response):
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                first = first or time.perf_counter()
                pieces.append(content)
        details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") or cached
    end = time.perf_counter()
    conn.close()
    return {"text": "".join(pieces).strip(), "ttft_ms": ((first or end) - t0) * 1e3, "total_ms": (end - t0) * 1e3,
            "cached_tokens": cached}


def http_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-schema messages: string contents stay strings, image parts become data-URL ``image_url`` parts."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append(dict(message))
        else:
            out.append({**message, "content": to_peer_messages([{"role": "user", "content": content}])[0]["content"]})
    return out


def _sse_data(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _process(args: list[str], health: str, env: dict[str, str], log: Path) -> Iterator[None]:
    """Run a server process until ``health`` answers 200; stop it afterwards."""
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, health, log)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen[bytes], health: str, log: Path) -> None:
    url = urllib.parse.urlsplit(health)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeFailure(f"server exited with {proc.returncode}: {log.read_text()[-400:]}")
        try:
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=2)
            conn.request("GET", url.path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeFailure(f"server did not answer {health} within {STARTUP_TIMEOUT_S} s")


@contextmanager
def _edgevlm_server(serve_args: list[str], cache: Path) -> Iterator[str]:
    port = free_port()
    env = dict(os.environ, EDGEVLM_CACHE_DIR=str(cache))
    args = [sys.executable, "-m", "edgevlm.cli.main", "serve", *serve_args, "--port", str(port)]
    with _process(args, f"http://127.0.0.1:{port}/health", env, cache.parent / "edgevlm-serve.log"):
        yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def _peer_server(vlm: VLM) -> Iterator[tuple[str | None, str]]:
    """llama-cpp-python's OpenAI server on vlm's files and settings: (base URL or None, description)."""
    try:
        import llama_cpp
        import llama_cpp.server.app  # noqa: F401 - needs llama-cpp-python's server extra
    except ImportError as exc:
        yield None, f"not measured: llama_cpp.server needs {exc.name} (pip install 'llama-cpp-python[server]')"
        return
    run, port = vlm.settings, free_port()
    args = [sys.executable, "-m", "edgevlm.benchmarks.peer_server", "--model", str(vlm.model_path),
            "--clip_model_path", str(vlm.mmproj_path), "--chat_format", "mtmd", "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(run.n_ctx), "--n_batch", str(run.n_batch),
            "--n_ubatch", str(run.n_batch), "--n_threads", str(run.n_threads),
            "--n_threads_batch", str(run.n_threads_batch), "--n_gpu_layers", str(run.n_gpu_layers),
            "--flash_attn", str(run.flash_attn == 1), "--verbose", "False"]
    with tempfile.TemporaryDirectory(prefix="edgevlm-peer-") as tmp:
        with _process(args, f"http://127.0.0.1:{port}/v1/models", dict(os.environ), Path(tmp) / "peer.log"):
            yield f"http://127.0.0.1:{port}/v1", f"llama-cpp-python {llama_cpp.__version__} (llama_cpp.server, mtmd)"
