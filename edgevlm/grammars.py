"""Grammars that constrain a reply: any JSON object, or JSON following a schema.

:func:`json_grammar` turns a JSON schema into the GBNF text that
``VLM.chat(..., grammar=...)`` takes; llama.cpp's grammar sampler then
admits only tokens that keep the reply a prefix of a valid document. The
schema conversion is llama-cpp-python's (``llama_cpp.llama_grammar``, the
Python port of llama.cpp's ``json-schema-to-grammar``), with remote ``$ref``
fetching off.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from edgevlm.errors import InvalidRequestError

#: Validation keywords the grammar conversion cannot enforce: refused rather than silently dropped.
UNENFORCEABLE = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minProperties",
                 "maxProperties", "uniqueItems", "not", "if", "then", "else", "patternProperties",
                 "dependentRequired", "dependentSchemas", "contains", "minContains", "maxContains")
_LOOSE_CHAR = re.compile(r'^(char ::= )\[\^"\\\\\]', re.MULTILINE)
#: Keywords whose values are maps of names to schemas (the names are not keywords).
_SCHEMA_MAPS = ("properties", "$defs", "definitions")


def json_grammar(schema: Mapping[str, Any] | bool | None = None) -> str:
    """GBNF for a JSON reply: any JSON object (``schema`` None), or one valid under ``schema``.

    Args:
        schema: a JSON schema (draft 2020-12 subset: types, properties,
            required, enums, consts, arrays with items/min/max, ``anyOf``/
            ``oneOf``, local ``$ref``/``$defs``, string patterns and formats),
            or None for any JSON object.

    Returns:
        The grammar text (start rule ``root``).

    Raises:
        InvalidRequestError: the schema is not a JSON object, refers to a
            remote document, or uses what the converter cannot express.
    """
    from llama_cpp import llama_grammar

    if schema is None:
        return llama_grammar.JSON_GBNF
    if not isinstance(schema, Mapping) and not isinstance(schema, bool):
        raise InvalidRequestError(f"a JSON schema must be an object, not {type(schema).__name__}")
    if isinstance(schema, Mapping):
        _refuse_unenforceable(schema, "the schema")
    try:
        text = json.dumps(schema)
        grammar = llama_grammar.json_schema_to_gbnf(text)
    except RecursionError:
        raise InvalidRequestError("the JSON schema nests too deeply to be turned into a grammar") from None
    except Exception as exc:  # the converter raises bare ValueError/KeyError/AssertionError/...
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InvalidRequestError(f"the JSON schema cannot be turned into a grammar: {detail}") from None
    # The port's string characters admit raw control characters, which JSON forbids (llama.cpp's own
    # converter excludes them): strings would not parse.
    return _LOOSE_CHAR.sub(r'\1[^"\\\\\\x7F\\x00-\\x1F]', grammar)


def _refuse_unenforceable(schema: Mapping[str, Any], where: str) -> None:
    """Raise on the first keyword in ``schema`` (nested schemas included) a grammar cannot enforce."""
    for key, value in schema.items():
        if key in UNENFORCEABLE:
            raise InvalidRequestError(f"the JSON schema uses '{key}' ({where}), which a grammar cannot enforce; "
                                      f"remove it and check that rule on the parsed reply")
        if key in _SCHEMA_MAPS and isinstance(value, Mapping):
            for name, sub in value.items():
                if isinstance(sub, Mapping):
                    _refuse_unenforceable(sub, f"{where}.{key}.{name}")
        elif isinstance(value, Mapping):
            _refuse_unenforceable(value, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    _refuse_unenforceable(item, f"{where}.{key}[{i}]")
