"""A tiny local stand-in for the Hugging Face Hub HTTP API (tests only).

Serves fake model repos from ``{repo_id: {filename: bytes}}`` on 127.0.0.1 and
implements just what ``huggingface_hub`` needs for ``HfApi.list_repo_files``,
``HfApi.model_info`` / ``repo_info``, ``snapshot_download`` and
``hf_hub_download``:

* ``GET /api/models/{repo}[/revision/{rev}]``  -> ModelInfo JSON (``sha``, ``siblings``)
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` -> list of tree entries
  (``type``, ``oid``, ``size``, ``path``, and ``lfs`` for LFS files; never ``xetHash``)
* ``HEAD|GET /{repo}/resolve/{rev}/{filename}`` -> the file (small text files) or,
  for LFS files (``*.gguf``), a 302 to a "CDN" url on another origin
  (``localhost`` instead of ``127.0.0.1``), carrying ``X-Linked-Etag`` /
  ``X-Linked-Size`` as the real Hub does, so huggingface_hub does not follow it
  during its HEAD call and downloads from ``Location``
* ``HEAD|GET /cdn/{sha256}?file={repo}/{filename}`` -> the LFS content
* ``GET /api/agent-harnesses`` -> an empty registry (asked once per process by
  huggingface_hub's user-agent code)

Every response about a repo carries ``X-Repo-Commit``; unknown repos get 404
with ``X-Error-Code: RepoNotFound``, unknown revisions ``RevisionNotFound`` and
unknown files ``EntryNotFound``. No Xet header is ever sent, so downloads are
plain HTTP. Requests are recorded (``requests``, ``count(...)``,
``downloaded``) and anything the server does not implement is listed in
``unhandled`` so tests can assert nothing unexpected was asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_API_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<filename>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha256>[0-9a-f]{64})$")


_RESOLVE_TEMPLATE = "/{repo_id}/resolve/{revision}/{filename}"  # huggingface_hub.constants, minus the endpoint


def set_hub_constant(monkeypatch: pytest.MonkeyPatch, name: str, value: object) -> None:
    """Patch one of huggingface_hub's import-time constants (when this version has it)."""
    from huggingface_hub import constants

    if hasattr(constants, name):
        monkeypatch.setattr(constants, name, value)


def use_test_hub_cache(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point huggingface_hub's import-time paths at the test's HF_HOME; returns the hub cache folder."""
    home = Path(os.environ["HF_HOME"])
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for name, value in {
        "HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HUGGINGFACE_HUB_CACHE": home / "hub",
        "HF_XET_CACHE": home / "xet", "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
        "AGENT_HARNESSES_PATH": home / ".agent_harnesses.json",
    }.items():
        set_hub_constant(monkeypatch, name, str(value))
    return home / "hub"


def point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Send huggingface_hub's requests to ``url``, offline mode off."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    set_hub_constant(monkeypatch, "ENDPOINT", url)
    set_hub_constant(monkeypatch, "HUGGINGFACE_CO_URL_TEMPLATE", url + _RESOLVE_TEMPLATE)
    set_hub_constant(monkeypatch, "HF_HUB_OFFLINE", False)


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    set_hub_constant(monkeypatch, "HF_HUB_OFFLINE", True)


def unreachable_url() -> str:
    """A 127.0.0.1 URL nobody listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A threaded HTTP server faking the Hub for ``repos`` ({repo_id: {filename: bytes}})."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = {repo: dict(files) for repo, files in repos.items()}
        self.commits = {repo: self._commit_of(files) for repo, files in self.repos.items()}
        self.lfs_blobs = {hashlib.sha256(data).hexdigest(): data
                          for files in self.repos.values() for name, data in files.items() if self._is_lfs(name)}
        self.requests: list[tuple[str, str]] = []   # (method, path) in arrival order
        self.downloaded: Counter[str] = Counter()    # "repo/filename" -> times its bytes were sent (GET)
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn_url = f"http://localhost:{self.port}"  # another origin: the HEAD redirect is not followed
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection --------------------------------------------------------------------------
    def count(self, path_contains: str = "", method: str | None = None) -> int:
        """Requests so far whose path contains ``path_contains`` (and of ``method``)."""
        with self._lock:
            return sum(1 for m, p in self.requests if path_contains in p and (method is None or m == method))

    def downloaded_files(self, repo_id: str) -> set[str]:
        with self._lock:
            prefix = repo_id + "/"
            return {key[len(prefix):] for key in self.downloaded if key.startswith(prefix)}

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _is_lfs(name: str) -> bool:
        return name.lower().endswith(LFS_SUFFIXES)

    @staticmethod
    def _commit_of(files: dict[str, bytes]) -> str:
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + git_blob_sha1(files[name]).encode())
        return digest.hexdigest()

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                pass

            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                hub._dispatch(self, "GET")

            def do_HEAD(self) -> None:  # noqa: N802
                hub._dispatch(self, "HEAD")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                hub._dispatch(self, "POST")

        return Handler

    # -- request handling --------------------------------------------------------------------
    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        self._record(method, path)
        try:
            if method in ("GET", "HEAD"):
                if path == "/api/agent-harnesses":  # huggingface_hub's agent detection registry
                    return self._json(h, method, {"standardEnvVars": [], "harnesses": {}}, {})
                if m := _API_TREE.match(path):
                    return self._tree(h, method, m["repo"], m["rev"], m["path"] or "", query)
                if m := _API_INFO.match(path):
                    return self._info(h, method, m["repo"], m["rev"] or "main")
                if m := _RESOLVE.match(path):
                    return self._resolve(h, method, m["repo"], m["rev"], m["filename"])
                if m := _CDN.match(path):
                    return self._cdn(h, method, m["sha256"], query.get("file", [""])[0])
            with self._lock:
                self.unhandled.append((method, path))
            self._send(h, method, 404, b'{"error":"not implemented by the fake hub"}',
                       {"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):  # client went away
            pass

    def _check_repo(self, h: BaseHTTPRequestHandler, method: str, repo: str, rev: str) -> str | None:
        """The commit for ``repo``@``rev``, or None after sending the Hub's 404."""
        if repo not in self.repos:
            self._error(h, method, 404, "RepoNotFound", "Repository not found")
            return None
        commit = self.commits[repo]
        if rev not in ("main", commit):
            self._error(h, method, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return commit

    def _info(self, h: BaseHTTPRequestHandler, method: str, repo: str, rev: str) -> None:
        commit = self._check_repo(h, method, repo, rev)
        if commit is None:
            return
        body = {
            "_id": commit[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit,
            "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "library_name": "gguf", "tags": ["gguf"],
            "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": name} for name in sorted(self.repos[repo])],
        }
        self._json(h, method, body, {"X-Repo-Commit": commit})

    def _tree(self, h: BaseHTTPRequestHandler, method: str, repo: str, rev: str, sub: str,
              query: dict[str, list[str]]) -> None:
        commit = self._check_repo(h, method, repo, rev)
        if commit is None:
            return
        recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries, folders = [], set()
        for name in sorted(self.repos[repo]):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            data = self.repos[repo][name]
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
            if self._is_lfs(name):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        if recursive:
            for name in self.repos[repo]:
                parts = name[len(prefix):].split("/")[:-1] if name.startswith(prefix) else []
                folders.update(prefix + "/".join(parts[:i + 1]) for i in range(len(parts)))
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._json(h, method, entries, {"X-Repo-Commit": commit})

    def _resolve(self, h: BaseHTTPRequestHandler, method: str, repo: str, rev: str, filename: str) -> None:
        commit = self._check_repo(h, method, repo, rev)
        if commit is None:
            return
        data = self.repos[repo].get(filename)
        if data is None:
            self._error(h, method, 404, "EntryNotFound", f"{filename} does not exist on \"{rev}\"",
                        {"X-Repo-Commit": commit})
            return
        if self._is_lfs(filename):
            sha256 = hashlib.sha256(data).hexdigest()
            self._send(h, method, 302, b"", {
                # like a signed CDN url: content-addressed path, the file named in the query
                "Location": f"{self.cdn_url}/cdn/{sha256}?file={quote(repo + '/' + filename, safe='')}",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_blob_sha1(data)}"',
            }, counted_file=None)
            return
        self._send(h, method, 200, data, {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit,
            "ETag": f'"{git_blob_sha1(data)}"',
        }, counted_file=f"{repo}/{filename}")

    def _cdn(self, h: BaseHTTPRequestHandler, method: str, sha256: str, file: str) -> None:
        data = self.lfs_blobs.get(sha256)
        if data is None:
            self._send(h, method, 404, b"NoSuchKey", {"Content-Type": "text/plain"})
            return
        self._send(h, method, 200, data, {"Content-Type": "application/octet-stream", "ETag": f'"{sha256}"'},
                   counted_file=file or sha256)

    def _error(self, h: BaseHTTPRequestHandler, method: str, status: int, code: str, message: str,
               extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(h, method, status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                             "X-Error-Message": message, **(extra or {})})

    def _json(self, h: BaseHTTPRequestHandler, method: str, obj: object, extra: dict[str, str]) -> None:
        self._send(h, method, 200, json.dumps(obj).encode(), {"Content-Type": "application/json", **extra})

    def _send(self, h: BaseHTTPRequestHandler, method: str, status: int, body: bytes, headers: dict[str, str],
              counted_file: str | None = None) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body)
            if counted_file:
                with self._lock:
                    self.downloaded[counted_file] += 1
