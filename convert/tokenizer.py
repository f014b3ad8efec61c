"""Vocabulary conversion: Hugging Face tokenizer files -> GGUF ``tokenizer.ggml.*``.

Supported sources, in order of preference:

* ``tokenizer.model`` (sentencepiece) -> ``tokenizer.ggml.model = "llama"``.
* ``tokenizer.json`` with a sentencepiece-style BPE (Metaspace / byte
  fallback) -> ``"llama"``, scores from merge ranks.
* ``tokenizer.json`` with a byte-level BPE -> ``"gpt2"`` with merges and a
  ``tokenizer.ggml.pre`` chosen from the pre-tokenizer regex.

Added tokens (``<image>``, ``<pad>``...) are placed at their ids (special ->
CONTROL, others -> USER_DEFINED) and the list is padded with ``[PAD{i}]`` up to
the embedding row count. Special ids, add_bos/add_eos flags and the chat
template are written via ``gguf.SpecialVocab`` plus our own template search.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm.errors import ConversionError

# Pre-tokenizer regexes of byte-level BPE vocabularies -> llama.cpp pre-tokenizer names.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                 r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, str] = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
GPT2_PRE = "default"  # plain ByteLevel(use_regex=True): the GPT-2 regex

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6)


@dataclass(frozen=True)
class Vocab:
    """A vocabulary ready for GGUF.

    Attributes:
        model: ``tokenizer.ggml.model`` (``"llama"`` or ``"gpt2"``).
        tokens: Token strings, one per embedding row.
        scores: Sentencepiece scores (``None`` for gpt2).
        types: ``gguf.TokenType`` values.
        merges: BPE merges (gpt2 only).
        pre: ``tokenizer.ggml.pre`` (gpt2 only).
        source: File the vocabulary came from.
    """

    model: str
    tokens: tuple[str, ...]
    scores: tuple[float, ...] | None
    types: tuple[int, ...]
    merges: tuple[str, ...] = ()
    pre: str | None = None
    source: str = ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON ({exc}).") from exc


def added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """Collect added tokens as ``id -> (content, special)`` from all HF files.

    Args:
        folder: Checkpoint folder.

    Returns:
        Merged view of ``tokenizer.json["added_tokens"]``,
        ``tokenizer_config.json["added_tokens_decoder"]`` and ``added_tokens.json``.
    """
    found: dict[int, tuple[str, bool]] = {}
    for tid, content in _read_json(folder / "added_tokens.json").items():
        found[int(content)] = (tid, True)
    decoder = _read_json(folder / "tokenizer_config.json").get("added_tokens_decoder", {})
    for tid, info in decoder.items():
        found[int(tid)] = (info["content"], bool(info.get("special", False)))
    for info in _read_json(folder / "tokenizer.json").get("added_tokens", []):
        found[int(info["id"])] = (info["content"], bool(info.get("special", False)))
    return found


def _spm_vocab(folder: Path) -> tuple[list[str], list[float], list[int]]:
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for tid in range(proc.vocab_size()):
        tokens.append(proc.id_to_piece(tid))
        scores.append(float(proc.get_score(tid)))
        if proc.is_unknown(tid):
            types.append(TOKEN_UNKNOWN)
        elif proc.is_control(tid):
            types.append(TOKEN_CONTROL)
        elif proc.is_unused(tid):
            types.append(TOKEN_UNUSED)
        elif proc.is_byte(tid):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
    return tokens, scores, types


def _is_sentencepiece_bpe(tok: dict[str, Any]) -> bool:
    model = tok.get("model", {})
    blob = json.dumps([tok.get("pre_tokenizer"), tok.get("normalizer"), tok.get("decoder")])
    return bool(model.get("byte_fallback")) or "Metaspace" in blob or "\u2581" in blob


def _json_bpe_base(tok: dict[str, Any], path: Path) -> tuple[list[str], list[str]]:
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ConversionError(f"{path}: tokenizer model {model.get('type')!r} is not supported; "
                              "only BPE tokenizer.json files (or tokenizer.model) are.")
    vocab: dict[str, int] = model["vocab"]
    tokens = [""] * (max(vocab.values()) + 1 if vocab else 0)
    for text, tid in vocab.items():
        tokens[tid] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, merges


def _json_spm_vocab(tok: dict[str, Any], path: Path) -> tuple[list[str], list[float], list[int]]:
    tokens, merges = _json_bpe_base(tok, path)
    rank = {m.replace(" ", ""): i for i, m in reversed(list(enumerate(merges)))}
    scores = [-float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)]
    types = []
    for text in tokens:
        is_byte = len(text) == 6 and text.startswith("<0x") and text.endswith(">")
        types.append(TOKEN_BYTE if is_byte else TOKEN_NORMAL)
    unk = tok.get("model", {}).get("unk_token")
    if unk in tokens:
        types[tokens.index(unk)] = TOKEN_UNKNOWN
    return tokens, scores, types


def _pre_tokenizer_name(tok: dict[str, Any], path: Path) -> str:
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    for regex in regexes:
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    if not regexes and any(p.get("type") == "ByteLevel" and p.get("use_regex", True)
                           for p in parts):
        return GPT2_PRE
    raise ConversionError(
        f"{path}: unknown byte-level pre-tokenizer {regexes or parts!r}; supported: "
        f"{', '.join(sorted(set(PRE_TOKENIZERS.values()) | {GPT2_PRE}))}.")


def _place_added(tokens: list[str], types: list[int], scores: list[float] | None,
                 added: dict[int, tuple[str, bool]], n_rows: int) -> None:
    """Put added tokens at their ids and pad to ``n_rows`` with ``[PAD{i}]``."""
    size = max([n_rows, len(tokens), *(i + 1 for i in added)])
    if size > n_rows:
        raise ConversionError(f"the tokenizer has {size} tokens but the embedding matrix only "
                              f"{n_rows} rows; tokenizer and weights do not belong together.")
    for i in range(len(tokens), size):
        tokens.append(f"[PAD{i}]")
        types.append(TOKEN_UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    for tid, (content, special) in sorted(added.items()):
        if tid < len(tokens) and tokens[tid] == content and types[tid] != TOKEN_UNUSED:
            continue  # already part of the base vocabulary (e.g. <s>)
        tokens[tid] = content
        types[tid] = TOKEN_CONTROL if special else TOKEN_USER_DEFINED
        if scores is not None:
            scores[tid] = -1000.0


def load_vocab(folder: Path, n_rows: int) -> Vocab:
    """Build the GGUF vocabulary of ``folder``, padded to ``n_rows`` entries.

    Args:
        folder: Checkpoint folder.
        n_rows: Rows of the token embedding matrix.

    Returns:
        The vocabulary.

    Raises:
        ConversionError: no supported tokenizer file, or more tokens than rows.
    """
    folder = Path(folder)
    added = added_tokens(folder)
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = _spm_vocab(folder)
        _place_added(tokens, types, scores, added, n_rows)
        return Vocab("llama", tuple(tokens), tuple(scores), tuple(types), source="tokenizer.model")
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has neither tokenizer.model nor tokenizer.json; copy "
                              "the tokenizer files of the model into the folder.")
    tok = _read_json(path)
    if _is_sentencepiece_bpe(tok):
        tokens, scores, types = _json_spm_vocab(tok, path)
        _place_added(tokens, types, scores, added, n_rows)
        return Vocab("llama", tuple(tokens), tuple(scores), tuple(types), source=path.name)
    tokens, merges = _json_bpe_base(tok, path)
    types = [TOKEN_NORMAL] * len(tokens)
    _place_added(tokens, types, None, added, n_rows)
    return Vocab("gpt2", tuple(tokens), None, tuple(types), tuple(merges),
                 _pre_tokenizer_name(tok, path), source=path.name)


def find_chat_template(folder: Path) -> str | None:
    """Return the chat template shipped with the checkpoint, if any.

    Looks at ``chat_template.jinja``, ``chat_template.json``,
    ``tokenizer_config.json["chat_template"]`` and ``processor_config.json``.
    """
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        template = _read_json(folder / name).get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            if isinstance(named.get("default"), str):
                return named["default"]
    return None


def write_vocab(writer: Any, folder: Path, n_rows: int,
                log: Callable[[str], None] | None = None,
                config_folder: Path | None = None) -> Vocab:
    """Add ``tokenizer.ggml.*`` keys (vocab, special ids, chat template) to ``writer``.

    Args:
        writer: A ``gguf.GGUFWriter``.
        folder: Checkpoint folder (or the folder holding only the tokenizer files).
        n_rows: Rows of the token embedding matrix.
        log: Optional progress callback.
        config_folder: A folder whose ``config.json`` supplies the special token
            ids (``bos_token_id``...) the tokenizer files in ``folder`` lack.

    Returns:
        The vocabulary that was written.

    Raises:
        ConversionError: see :func:`load_vocab`.
    """
    import gguf

    vocab = load_vocab(folder, n_rows)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    if vocab.scores is not None:
        writer.add_token_scores(list(vocab.scores))
    writer.add_token_types(list(vocab.types))
    special = gguf.SpecialVocab(folder, load_merges=vocab.model == "gpt2", n_vocab=n_rows)
    if config_folder is not None:
        config = _read_json(Path(config_folder) / "config.json")
        for typ in special.special_token_types:
            tid = config.get(f"{typ}_token_id")
            if isinstance(tid, int) and 0 <= tid < n_rows:
                special.special_token_ids.setdefault(typ, tid)
    if vocab.model == "llama" and special.add_special_token.get("bos") is None:
        special.add_special_token["bos"] = True  # Llama's default
    if special.chat_template is None:
        special.chat_template = find_chat_template(folder)
    special.add_to_gguf(writer, quiet=True)
    if log is not None:
        log(f"vocabulary: {vocab.model}, {len(vocab.tokens)} tokens from {vocab.source}")
    return vocab
