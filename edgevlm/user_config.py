"""edgevlm's settings file (``edgevlm config``) and the model used when none is given.

The file is a small JSON object in the platform config folder
(``platformdirs.user_config_dir("edgevlm")``, e.g. ``~/.config/edgevlm/config.json``;
``EDGEVLM_CONFIG_DIR`` overrides the folder). Which model runs when none is
named: ``--model`` / ``load(model)`` > ``EDGEVLM_MODEL`` > the file's ``model`` >
:data:`edgevlm.constants.DEFAULT_MODEL` (downloaded on first use).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgevlm import constants as C
from edgevlm.errors import ConfigError
from edgevlm.resolve import looks_like_repo_id

CONFIG_FILE = "config.json"
#: The keys the file may hold, and what each one does.
CONFIG_KEYS = {
    "model": "the model chat, serve, bench and edgevlm.load() use when none is given "
             "(a folder, an LLM .gguf file or a Hugging Face repo id)",
}

__all__ = ["CONFIG_KEYS", "UserConfig", "config_dir", "resolve_model_name"]


def config_dir() -> Path:
    """The folder of edgevlm's config file (``EDGEVLM_CONFIG_DIR`` or the platform config folder)."""
    env = os.environ.get(C.ENV_CONFIG_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("edgevlm", appauthor=False))


def _check_key(key: str) -> None:
    if key not in CONFIG_KEYS:
        raise ConfigError(f"unknown config key {key!r}; the keys are: {', '.join(sorted(CONFIG_KEYS))}")


def _model_value(value: str) -> str:
    """A local model as an absolute path (so it works from any folder), a repo id as given."""
    path = Path(value).expanduser()
    if path.exists():
        return str(path.resolve())
    if looks_like_repo_id(value):
        return value
    raise ConfigError(f"{value} is neither an existing folder or .gguf file nor a Hugging Face repo id "
                      "(owner/name)")


class UserConfig:
    """edgevlm's settings file.

    Args:
        path: the file (default: ``config.json`` in :func:`config_dir`).

    Attributes:
        KEYS: the keys the file may hold, and what each one does.
    """

    KEYS = CONFIG_KEYS

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else config_dir() / CONFIG_FILE

    def values(self) -> dict[str, str]:
        """Everything the file holds (empty when there is no file).

        Raises:
            ConfigError: the file is not a JSON object of strings.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {self.path}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"the config file {self.path} is not valid JSON ({exc.msg}, line {exc.lineno}); "
                              "fix or delete it") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ConfigError(f"the config file {self.path} must hold a JSON object of strings; fix or delete it")
        return data

    def get(self, key: str) -> str | None:
        """The value of ``key``, None when unset.

        Raises:
            ConfigError: an unknown key, or an unreadable file.
        """
        _check_key(key)
        return self.values().get(key)

    def set(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` (a local model is stored as an absolute path).

        Returns:
            The value stored.

        Raises:
            ConfigError: an unknown key, a model that is neither a local path nor a repo id, or a
                file that cannot be read or written.
        """
        _check_key(key)
        stored = _model_value(value) if key == "model" else value
        values = self.values()
        values[key] = stored
        self._write(values)
        return stored

    def unset(self, key: str) -> bool:
        """Remove ``key``; returns whether it was set.

        Raises:
            ConfigError: an unknown key, or a file that cannot be read or written.
        """
        _check_key(key)
        values = self.values()
        if key not in values:
            return False
        del values[key]
        self._write(values)
        return True

    def _write(self, values: dict[str, str]) -> None:
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(temp, self.path)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise ConfigError(f"cannot write the config file {self.path}: {exc.strerror or exc}") from exc


def resolve_model_name(model: str | os.PathLike[str] | None = None) -> str:
    """The model to load when ``model`` may be missing.

    Args:
        model: what the caller named (``--model``, ``load(model)``), or None.

    Returns:
        ``model`` when given; else ``EDGEVLM_MODEL``; else the config file's ``model``
        (``edgevlm config set model ...``); else the repo id of
        :data:`edgevlm.constants.DEFAULT_MODEL`, which :func:`edgevlm.load` downloads on
        first use (the files, their sizes and the destination are printed first).

    Raises:
        ConfigError: the config file is unreadable.
    """
    if model is not None:
        return os.fspath(model)
    env = os.environ.get(C.ENV_MODEL, "").strip()
    if env:
        return env
    configured = UserConfig().values().get("model")
    return configured or C.DEFAULT_MODEL.repo_id
