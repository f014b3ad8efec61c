"""One version: edgevlm.__version__, which pyproject.toml reads (no second copy to keep in step)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import edgevlm
from edgevlm.convert.base import edgevlm_version

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_reads_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "edgevlm.__version__"}


def test_installed_metadata_and_converted_files_carry_the_package_version():
    assert importlib.metadata.version("edgevlm") == edgevlm.__version__ == edgevlm_version()
