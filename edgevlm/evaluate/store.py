"""A run's folder: its manifest (what the run is) and its append-only predictions log.

Resuming rests on two rules: a run's manifest (model identity, prompt,
system prompt, choices, method, chain of thought and whether the direct
answer is scored too, image budget, compared model) must match the folder's, else the run is refused unless restarted;
and ``predictions.jsonl`` only ever grows, one line per item, written and
flushed to disk before the next item starts. A line cut short by a crash is
dropped (only that fragment: earlier lines are never rewritten).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edgevlm.errors import DataError, RunConflictError

LOG = logging.getLogger("edgevlm")

MANIFEST = "manifest.json"
PREDICTIONS = "predictions.jsonl"
ERRORS = "errors.jsonl"
METRICS = "metrics.json"
CONFUSION = "confusion.png"
F1_CHART = "f1.png"
#: Everything a run writes into its folder (what --restart removes).
RUN_FILES = (MANIFEST, PREDICTIONS, ERRORS, METRICS, CONFUSION, F1_CHART)
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class RunManifest:
    """What a run is: two runs may share a folder only when all of this matches."""

    version: int
    model: str
    prompt: str
    system: str
    choices: tuple[str, ...]
    choices_sha256: str
    method: str
    cot: bool
    cot_tokens: int
    image_tokens: int | None
    compare: str | None
    #: --direct-too: the direct answer scored beside the CoT one (False in folders written before it existed).
    direct: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["choices"] = list(self.choices)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunManifest:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["choices"] = tuple(values.get("choices", ()))
        return cls(**{f.name: values.get(f.name, None if f.default is MISSING else f.default) for f in fields(cls)})

    def differences(self, other: RunManifest) -> list[str]:
        """The fields in which ``other`` differs."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def prepare(out: Path, manifest: RunManifest, *, restart: bool) -> None:
    """Make ``out`` hold ``manifest``'s run: new, resumed, or (``restart``) started over.

    Raises:
        RunConflictError: ``out`` holds another run and ``restart`` is off.
        DataError: ``out`` is a file, or its manifest is unreadable.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    if restart:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    path = out / MANIFEST
    if path.exists():
        try:
            theirs = RunManifest.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise DataError(f"{path} is unreadable ({exc}); remove it or use --restart") from None
        different = manifest.differences(theirs)
        if different:
            raise RunConflictError(
                f"{out} holds another run (different {', '.join(different)}); use another --out, or "
                "--restart to delete its results and start over")
        return
    if (out / PREDICTIONS).exists():
        raise RunConflictError(f"{out} has predictions but no {MANIFEST}; use another --out or --restart")
    _write_json(path, manifest.to_json())


class PredictionLog:
    """``predictions.jsonl``: one JSON object a line, appended and synced per item."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """Every complete line (a torn last line is cut off the file first).

        Raises:
            DataError: a complete line is not a JSON object (the file was edited by hand).
        """
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            LOG.warning("%s: dropping a line cut short by an interruption", self.path)
            with self.path.open("r+b") as fh:
                fh.truncate(keep)
            data = data[:keep]
        out = []
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise DataError(f"{self.path} line {number} is not a JSON object; fix it or use --restart")
            out.append(record)
        return out

    def append(self, record: dict[str, Any]) -> None:
        """Add one line and make sure it is on disk before returning."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def write_errors(path: Path, errors: list[dict[str, Any]]) -> None:
    """``errors.jsonl``: this run's failed items (rewritten each run; failed items are retried)."""
    if not errors:
        path.unlink(missing_ok=True)
        return
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors), encoding="utf-8")


def write_metrics(path: Path, data: dict[str, Any]) -> None:
    _write_json(path, data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
