"""The model used when none is named: --model > EDGEVLM_MODEL > `edgevlm config` > the default, downloaded once.

The default is served by the local fake hub (tests/fakehub.py): ``DEFAULT_MODEL``
is pointed at a fake repo holding the converted ``siglip_f32`` pair at the fake
repo's commit, exactly as the real constant pins a commit of the real repo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgevlm
from edgevlm import constants as C
from edgevlm.cli.main import cli
from edgevlm.errors import ConfigError, ModelNotFoundError
from tests.fakehub import FakeHub, go_offline, point_hub_at, unreachable_url

REPO = "fake/default-vlm"
LLM, PROJ = "default-vlm-Q4_K_M.gguf", "mmproj-default-vlm-Q8_0.gguf"
ANNOUNCED = "downloading the default model"


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


def _decimal(nbytes: int) -> str:
    """The size as the hub's pages show it (the announcement's unit)."""
    scale, unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "bytes")) if nbytes >= s)
    return f"{nbytes / scale:.3g} {unit}"


@pytest.fixture
def default_hub(hf_cache: Path, siglip_f32: Path, monkeypatch: pytest.MonkeyPatch):
    llm = next(p for p in siglip_f32.glob("*.gguf") if not p.name.startswith("mmproj")).read_bytes()
    proj = next(siglip_f32.glob("mmproj-*.gguf")).read_bytes()
    hub = FakeHub({REPO: {LLM: llm, PROJ: proj, "default-vlm-F16.gguf": llm, "mmproj-default-vlm-f16.gguf": proj,
                          "README.md": b"# default (test)\n"}}).start()
    try:
        point_hub_at(monkeypatch, hub.url)
        monkeypatch.setattr(C, "DEFAULT_MODEL", C.HubModel("default-vlm", REPO, hub.commits[REPO], LLM, len(llm),
                                                           PROJ, len(proj)))
        yield hub
    finally:
        hub.stop()
    assert not hub.unhandled, hub.unhandled


CHAT = ["--max-tokens", "2", "--temperature", "0", "--threads", "2", "--ctx", "256"]


def test_chat_without_model_announces_and_downloads_the_default_once(default_hub, hf_cache, painting):
    args = ["chat", "--image", str(painting), "-p", "What genre?", *CHAT]
    first = _runner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    notes = [line for line in first.stderr.splitlines() if ANNOUNCED in line]
    assert len(notes) == 1, first.stderr
    model = C.DEFAULT_MODEL
    for needle in (REPO, f"{LLM} ({_decimal(model.llm_bytes)})", f"{PROJ} ({_decimal(model.mmproj_bytes)})",
                   f"{_decimal(model.llm_bytes + model.mmproj_bytes)} in all", str(hf_cache / "models--fake--default-vlm")):
        assert needle in notes[0], (needle, notes[0])
    assert first.stdout.strip(), "no answer"
    assert default_hub.downloaded_files(REPO) == {LLM, PROJ}  # the pinned pair only, once each
    assert all(n == 1 for n in default_hub.downloaded.values())

    asked = len(default_hub.requests)
    second = _runner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert second.stderr == "", second.stderr  # from the cache: no announcement, no progress bar
    with edgevlm.load(n_ctx=256, n_threads=2) as vlm:  # the Python API resolves the same way
        assert vlm.model_path.name == LLM and hf_cache in vlm.model_path.parents
        assert vlm.mmproj_path is not None and vlm.mmproj_path.name == PROJ
    assert len(default_hub.requests) == asked, default_hub.requests[asked:]


def test_default_from_the_cache_while_offline(default_hub, monkeypatch, painting):
    assert _runner().invoke(cli, ["chat", "-p", "Hi", *CHAT]).exit_code == 0
    asked = len(default_hub.requests)
    go_offline(monkeypatch)
    res = _runner().invoke(cli, ["chat", "--image", str(painting), "-p", "Hi", *CHAT])
    assert res.exit_code == 0 and res.stderr == "", res.output
    assert len(default_hub.requests) == asked


def test_only_the_missing_file_is_announced(default_hub, capsys):
    from edgevlm.resolve import resolve

    first = resolve(REPO)
    assert capsys.readouterr().err.count(ANNOUNCED) == 1
    assert first.mmproj is not None
    first.mmproj.unlink()
    assert resolve(REPO) == first
    err = capsys.readouterr().err
    assert err.count(ANNOUNCED) == 1 and PROJ in err and LLM not in err, err
    assert resolve(REPO, quant="f16").llm.name == "default-vlm-F16.gguf"  # a quant: the repo's generic choice


def test_offline_with_nothing_cached_is_one_line(painting):
    """A real process, the real default, HF_HUB_OFFLINE=1 and an empty HF_HOME (isolated_dirs)."""
    proc = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "chat", "--image", str(painting), "-p", "hi"],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error: the default model"), proc.stderr
    for needle in ("--model", "EDGEVLM_MODEL", "`edgevlm config set model`", C.DEFAULT_MODEL.repo_id,
                   "HF_HUB_OFFLINE"):
        assert needle in lines[0], needle
    assert ANNOUNCED not in proc.stderr


def test_unreachable_hub_with_nothing_cached_is_one_line(hf_cache, monkeypatch):
    import huggingface_hub.utils._http as hf_http

    point_hub_at(monkeypatch, unreachable_url())
    monkeypatch.setattr(hf_http.time, "sleep", lambda _s: None)  # skip any retry back-off
    res = _runner().invoke(cli, ["chat", "-p", "hi"])
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not be reached" in lines[0] and "--model" in lines[0], res.output
    assert not hf_cache.exists() or not list(hf_cache.rglob("*.gguf"))


def test_python_api_offline_with_nothing_cached(monkeypatch):
    go_offline(monkeypatch)
    with pytest.raises(ModelNotFoundError, match="edgevlm.load\\(model\\)"):
        edgevlm.load()


def test_precedence_argument_env_config_default(siglip_f32, monkeypatch):
    assert edgevlm.resolve_model_name() == C.DEFAULT_MODEL.repo_id
    edgevlm.UserConfig().set("model", str(siglip_f32))
    assert edgevlm.resolve_model_name() == str(siglip_f32.resolve())
    monkeypatch.setenv("EDGEVLM_MODEL", "owner/from-env")
    assert edgevlm.resolve_model_name() == "owner/from-env"
    assert edgevlm.resolve_model_name("given/model") == "given/model"
    assert edgevlm.resolve_model_name(Path("x.gguf")) == "x.gguf"


def test_configured_and_env_models_run_chat_without_model(siglip_f32, clip_f32, monkeypatch, tmp_path):
    monkeypatch.chdir(siglip_f32.parent)
    res = _runner().invoke(cli, ["config", "set", "model", siglip_f32.name])  # relative: stored absolute
    assert res.exit_code == 0 and str(siglip_f32.resolve()) in res.stdout, res.output
    monkeypatch.chdir(tmp_path)
    assert _runner().invoke(cli, ["chat", "-p", "Hi", *CHAT]).exit_code == 0
    assert _runner().invoke(cli, ["config", "get", "model"]).stdout.strip() == str(siglip_f32.resolve())
    monkeypatch.setenv("EDGEVLM_MODEL", "/nonexistent/from-env")  # the environment beats the file
    res = _runner().invoke(cli, ["chat", "-p", "Hi", *CHAT])
    assert res.exit_code != 0 and "/nonexistent/from-env" in res.output
    assert "overrides" in _runner().invoke(cli, ["config", "get", "model"]).stderr
    res = _runner().invoke(cli, ["chat", "--model", str(clip_f32), "-p", "Hi", *CHAT])  # --model beats both
    assert res.exit_code == 0, res.output


def test_config_commands(tmp_path, siglip_f32):
    runner = _runner()
    path = Path(runner.invoke(cli, ["config", "path"]).stdout.strip())
    assert path == Path(os.environ["XDG_CONFIG_HOME"]) / "edgevlm" / "config.json" and not path.exists()
    unset = runner.invoke(cli, ["config", "get", "model"])
    assert unset.exit_code == 1 and unset.stdout == "" and "not set" in unset.stderr
    assert runner.invoke(cli, ["config", "set", "model", "owner/repo"]).exit_code == 0
    assert json.loads(path.read_text()) == {"model": "owner/repo"}
    assert runner.invoke(cli, ["config", "get"]).stdout == "model = owner/repo\n"
    assert runner.invoke(cli, ["config", "unset", "model"]).stdout == "model removed\n"
    assert runner.invoke(cli, ["config", "unset", "model"]).stdout == "model was not set\n"
    assert json.loads(path.read_text()) == {}


@pytest.mark.parametrize("args,needle", [
    (["config", "set", "colour", "red"], "unknown config key 'colour'; the keys are: model"),
    (["config", "get", "colour"], "unknown config key"),
    (["config", "set", "model", "no/such/path.gguf"], "neither an existing folder or .gguf file nor"),
])
def test_config_errors_are_one_line(args, needle):
    res = _runner().invoke(cli, args)
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error:") and needle in lines[0], res.output


def test_a_damaged_config_file_is_named(monkeypatch):
    config = edgevlm.UserConfig()
    config.path.parent.mkdir(parents=True)
    config.path.write_text("{model = 'x'")
    with pytest.raises(ConfigError, match="not valid JSON"):
        edgevlm.resolve_model_name()
    res = _runner().invoke(cli, ["chat", "-p", "hi"])
    assert res.exit_code == 2 and str(config.path) in res.output and "fix or delete it" in res.output
    config.path.write_text('["x"]')
    with pytest.raises(ConfigError, match="JSON object of strings"):
        config.get("model")
