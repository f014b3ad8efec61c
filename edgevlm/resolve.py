"""Find the LLM and projector files: a folder, explicit paths, or a hub repo id."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgevlm import constants as C
from edgevlm.constants import GGUF_SUFFIX, HubModel
from edgevlm.descriptor import ModelFiles
from edgevlm.errors import HubError, InvalidRequestError, ModelNotFoundError
from edgevlm.gguf_info import read_header

LOG = logging.getLogger("edgevlm")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

__all__ = ["ModelFiles", "looks_like_repo_id", "resolve"]
#: How to name a model, for messages (the same in the CLI and the Python API).
HOW_TO_NAME_A_MODEL = (f"name a model with --model, {C.ENV_MODEL} or `edgevlm config set model` (a folder, "
                       "an LLM .gguf file or a Hugging Face repo id; in Python: edgevlm.load(model))")


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hugging Face repo id (``owner/name``, not a ``.gguf`` path)."""
    return bool(_REPO_ID.match(text)) and not text.endswith(GGUF_SUFFIX)


def resolve(model: str | os.PathLike[str], mmproj: str | os.PathLike[str] | None = None, *,
            quant: str | None = None, revision: str | None = None) -> ModelFiles:
    """Locate the GGUF pair for ``model``.

    Args:
        model: a folder holding one LLM GGUF and one projector GGUF, an LLM
            ``.gguf`` file, or a Hugging Face repo id (``owner/name``). The repo
            of :data:`edgevlm.constants.DEFAULT_MODEL` (with no ``mmproj``,
            ``quant`` or ``revision``) is its pinned pair, read from the cache
            without a request or else announced on stderr and downloaded.
        mmproj: the projector file, when ``model`` is a file (found next to it
            otherwise).
        quant: with a folder or repo holding several LLM files, the one whose
            name contains this (e.g. ``q4_k_m``).
        revision: hub revision (branch, tag or commit).

    Raises:
        ModelNotFoundError: nothing usable at that path / repo.
        InvalidRequestError: the choice is ambiguous (lists the candidates).
        HubError: the download failed.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return _from_folder(path, quant, mmproj)
    if path.is_file():
        proj = Path(mmproj).expanduser() if mmproj else _find_projector(path.parent)
        if proj is not None and not proj.is_file():
            raise ModelNotFoundError(f"projector file not found: {proj}")
        return ModelFiles(path, proj)
    if isinstance(model, str) and looks_like_repo_id(model):
        if model == C.DEFAULT_MODEL.repo_id and mmproj is None and quant is None and revision is None:
            return _from_default(C.DEFAULT_MODEL)
        return _from_hub(model, quant, revision, mmproj)
    raise ModelNotFoundError(f"model not found: {model} (give a folder, a .gguf file or a Hugging Face repo id)")


def _is_projector(path: Path) -> bool:
    # The whole header (tensor infos too): read_header keeps it, so describe_model does not parse it again.
    try:
        return read_header(path).architecture == "clip"
    except Exception:  # noqa: BLE001 - unreadable files are reported by the loader
        return path.name.lower().startswith("mmproj")


def _classify(folder: Path) -> tuple[list[Path], list[Path]]:
    """The folder's GGUF files as (LLMs, projectors); each header is read once."""
    llms: list[Path] = []
    projs: list[Path] = []
    for path in sorted(folder.glob(f"*{GGUF_SUFFIX}")):
        (projs if _is_projector(path) else llms).append(path)
    return llms, projs


def _pick(paths: list[Path], quant: str | None, what: str, folder: Path) -> Path | None:
    if quant:
        wanted = quant.lower().replace("-", "_")
        paths = [p for p in paths if wanted in p.name.lower().replace("-", "_")] or paths
    if len(paths) > 1:
        names = ", ".join(sorted(p.name for p in paths))
        raise InvalidRequestError(f"{folder} holds several {what} files ({names}); choose one with "
                                  f"--quant / quant= or pass the file path")
    return paths[0] if paths else None


def _find_projector(folder: Path, projs: list[Path] | None = None) -> Path | None:
    if projs is None:
        projs = _classify(folder)[1]
    if len(projs) > 1:
        f16 = [p for p in projs if "f16" in p.name.lower()]
        projs = f16 if len(f16) == 1 else projs
    return _pick(projs, None, "projector", folder)


def _from_folder(folder: Path, quant: str | None, mmproj: str | os.PathLike[str] | None) -> ModelFiles:
    llms, projs = _classify(folder)
    llm = _pick(llms, quant, "LLM", folder)
    if llm is None:
        raise ModelNotFoundError(f"no LLM .gguf file in {folder}; convert a checkpoint with "
                                 "`edgevlm convert` or pass the files explicitly")
    proj = Path(mmproj) if mmproj else _find_projector(folder, projs)
    return ModelFiles(llm, proj)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's and the HTTP client's failures into edgevlm errors naming ``repo_id``."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    try:
        yield
    except (ModelNotFoundError, InvalidRequestError, HubError):
        raise
    except GatedRepoError as exc:
        raise HubError(f"{repo_id} is a gated repo: accept its conditions on the hub page and log in "
                       "(`hf auth login` or HF_TOKEN)") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"Hugging Face repo {repo_id} not found (check the name; for a private repo "
                                 "log in with `hf auth login` or set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"revision {revision!r} not found in Hugging Face repo {repo_id}") from exc
    except LocalEntryNotFoundError as exc:  # online, but the files could not be fetched nor found in the cache
        raise HubError(f"could not download {repo_id}{at} and it is not in the local cache: {exc}") from exc
    except HfHubHTTPError as exc:
        raise HubError(f"could not fetch {repo_id} from the hub: {exc}") from exc
    except OSError as exc:
        raise HubError(f"could not fetch {repo_id}: {exc}") from exc
    except Exception as exc:
        # Transport errors of the HTTP client (httpx / requests) are not OSErrors.
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            raise HubError(f"could not reach the Hugging Face hub for {repo_id}: {exc}") from exc
        raise


def _from_hub(repo_id: str, quant: str | None, revision: str | None,
              mmproj: str | os.PathLike[str] | None) -> ModelFiles:
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise HubError(f"huggingface_hub is required to download {repo_id}: {exc}") from exc
    at = f" at revision {revision!r}" if revision else ""
    with _hub_errors(repo_id, revision):
        if _hub_offline():
            try:
                folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
            except LocalEntryNotFoundError as exc:
                # IncompleteSnapshotError (huggingface_hub >= 1.x): the snapshot holds only some of the
                # repo's files -- the normal state here, as only the chosen GGUFs are downloaded.
                snapshot = getattr(exc, "snapshot_path", None)
                if not snapshot or not Path(snapshot).is_dir():
                    raise ModelNotFoundError(
                        f"{repo_id}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                        "download it once without HF_HUB_OFFLINE") from exc
                folder = Path(snapshot)
            cached = sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"*{GGUF_SUFFIX}"))
            wanted = _choose_hub_files(repo_id, cached, quant, offline=True)
        else:
            files = [f for f in HfApi().list_repo_files(repo_id, revision=revision)
                     if f.lower().endswith(GGUF_SUFFIX)]
            wanted = _choose_hub_files(repo_id, files, quant)
            if mmproj:
                wanted = wanted[:1]  # the caller's projector replaces the repo's
            LOG.info("downloading %s from %s", ", ".join(wanted), repo_id)
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted))
    return _snapshot_files(folder, wanted, mmproj)


def _cached(pair: HubModel, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(pair.repo_id, filename, revision=pair.revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _human(nbytes: int) -> str:
    """Bytes as the hub's pages show them (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


def _default_unavailable(pair: HubModel, reason: str) -> ModelNotFoundError:
    total = _human(pair.llm_bytes + pair.mmproj_bytes)
    return ModelNotFoundError(f"the default model {pair.repo_id} ({total}) is not in the "
                              f"Hugging Face cache and cannot be downloaded ({reason}); {HOW_TO_NAME_A_MODEL}")


def _remote_sizes(pair: HubModel, files: list[str]) -> dict[str, int]:
    """The hub's sizes of ``files`` (HEAD requests), or the one-line how-to when the hub cannot be reached."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    known = {pair.llm_file: pair.llm_bytes, pair.mmproj_file: pair.mmproj_bytes}
    try:
        with _hub_errors(pair.repo_id, pair.revision):
            sizes = {f: get_hf_file_metadata(hf_hub_url(pair.repo_id, f, revision=pair.revision)).size
                     for f in files}
    except HubError as exc:
        LOG.debug("the hub did not answer for %s: %s", pair.repo_id, exc.__cause__ or exc)
        raise _default_unavailable(pair, "the Hugging Face hub could not be reached") from exc
    return {f: size or known[f] for f, size in sizes.items()}


def _from_default(pair: HubModel) -> ModelFiles:
    """The pinned pair: from the cache without a request, else announced (once, on stderr) and downloaded."""
    from huggingface_hub import constants, hf_hub_download

    cached = {f: _cached(pair, f) for f in (pair.llm_file, pair.mmproj_file)}
    paths = {f: path for f, path in cached.items() if path is not None}
    missing = [f for f in cached if f not in paths]
    if missing:
        if _hub_offline():
            raise _default_unavailable(pair, "HF_HUB_OFFLINE is set")
        sizes = _remote_sizes(pair, missing)
        folder = Path(constants.HF_HUB_CACHE) / f"models--{pair.repo_id.replace('/', '--')}"
        listed = " and ".join(f"{f} ({_human(sizes[f])})" for f in missing)
        print(f"edgevlm: downloading the default model, {pair.name} ({pair.repo_id}): {listed}, "
              f"{_human(sum(sizes.values()))} in all, into {folder} (once; another model: --model, "
              f"{C.ENV_MODEL} or `edgevlm config set model`)", file=sys.stderr, flush=True)
        with _hub_errors(pair.repo_id, pair.revision):
            for f in missing:
                paths[f] = Path(hf_hub_download(pair.repo_id, f, revision=pair.revision))
    return ModelFiles(paths[pair.llm_file], paths[pair.mmproj_file])


def _snapshot_files(folder: Path, wanted: list[str], mmproj: str | os.PathLike[str] | None) -> ModelFiles:
    """The chosen files of a downloaded snapshot; the caller's projector replaces the repo's."""
    if mmproj:
        proj: Path | None = Path(mmproj).expanduser()
        if proj is not None and not proj.is_file():
            raise ModelNotFoundError(f"projector file not found: {proj}")
    else:
        proj = folder / wanted[1] if len(wanted) > 1 else None
    return ModelFiles(folder / wanted[0], proj)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE from the environment, or as huggingface_hub read it at import."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _choose_hub_files(repo_id: str, files: list[str], quant: str | None, *, offline: bool = False) -> list[str]:
    """The LLM GGUF (first) and the projector GGUF (if any) to use among a repo's ``files``.

    The LLM is the one whose name contains ``quant``, else the only one, else the
    ``q4_k_m`` one; the projector (a name containing ``mmproj``) prefers f16.
    """
    where = f"the cached copy of {repo_id}" if offline else repo_id
    projs = [f for f in files if "mmproj" in Path(f).name.lower()]  # mmproj-x-f16.gguf, x.mmproj-f16.gguf
    llms = [f for f in files if f not in projs]
    if not llms:
        if offline:
            raise ModelNotFoundError(f"{where} holds no LLM .gguf file and HF_HUB_OFFLINE is set; "
                                     "download it once without HF_HUB_OFFLINE")
        raise ModelNotFoundError(f"{repo_id} has no GGUF LLM files (edgevlm runs GGUF models; convert a "
                                 "checkpoint with `edgevlm convert`)")
    if quant:
        wanted = quant.lower().replace("-", "_")
        matching = [f for f in llms if fnmatch.fnmatch(f.lower().replace("-", "_"), f"*{wanted}*")]
        if not matching and offline:
            raise ModelNotFoundError(f"no LLM file in {where} matches quant {quant!r} (cached: "
                                     f"{', '.join(llms)}) and HF_HUB_OFFLINE is set; download it once "
                                     "without HF_HUB_OFFLINE")
        if not matching:
            raise InvalidRequestError(f"no LLM file in {where} matches quant {quant!r} "
                                      f"(available: {', '.join(llms)})")
        llms = matching
    if len(llms) > 1:
        default = [f for f in llms if "q4_k_m" in f.lower().replace("-", "_")]
        if len(default) != 1:
            raise InvalidRequestError(f"{where} has several LLM files ({', '.join(llms)}); "
                                      "choose one with --quant / quant=")
        llms = default
    if len(projs) > 1:
        projs = [f for f in projs if "f16" in f.lower()][:1] or projs[:1]
    return llms + projs
