"""Structured output formats as llguidance grammars, and the check that they compile.

A `ResponseFormat` (JSON Schema, any JSON object, regex, Lark grammar) becomes one
llguidance grammar string; its digest is the key of every cache (the router's
check here, the worker's compiled matchers). llguidance has no dependencies and no
torch, so the router checks formats with the same library the worker runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from threading import Lock
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache
from llguidance import LLMatcher

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

JSON_SCHEMA = "json_schema"
JSON_OBJECT = "json_object"
REGEX = "regex"
GRAMMAR = "grammar"
_ANY_OBJECT = '{"type": "object"}'
# Compact JSON (",", ":" and no other whitespace): fewer tokens, and a model cannot
# spend its budget on blank space. A schema may still choose otherwise ("x-guidance").
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}

_problems: LRUCache[bytes, str] = LRUCache(maxsize=1024)
_problems_lock = Lock()


@dataclass(frozen=True)
class ResponseFormat:
    """A request's output format: `kind` is one of the names above, `text` its source."""

    kind: str
    text: str = ""  # the schema, regex or grammar ("" for json_object)

    @classmethod
    def of_json_schema(cls, schema: dict[str, Any] | str) -> ResponseFormat:
        """Output one JSON value valid under `schema` (a dict or its JSON text)."""
        return cls(JSON_SCHEMA, schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def of_json_object(cls) -> ResponseFormat:
        """Output any one JSON object."""
        return cls(JSON_OBJECT)

    @classmethod
    def of_regex(cls, pattern: str) -> ResponseFormat:
        """Output text matching `pattern` as a whole."""
        return cls(REGEX, pattern)

    @classmethod
    def of_grammar(cls, lark: str) -> ResponseFormat:
        """Output a sentence of the llguidance Lark grammar `lark` (start rule `start`)."""
        return cls(GRAMMAR, lark)

    def grammar(self) -> str:
        """The llguidance grammar (raises ValueError for a schema that is not a JSON object)."""
        if self.kind == JSON_SCHEMA:
            return LLMatcher.grammar_from_json_schema(self.text, _JSON_OPTIONS)
        if self.kind == JSON_OBJECT:
            return LLMatcher.grammar_from_json_schema(_ANY_OBJECT, _JSON_OPTIONS)
        if self.kind == REGEX:
            return LLMatcher.grammar_from_regex(self.text)
        return LLMatcher.grammar_from_lark(self.text)


def format_problem(given: ResponseFormat) -> str | None:
    """Why the format cannot constrain a generation (llguidance's words); None if it can."""
    if given.kind == JSON_SCHEMA:
        try:
            schema = json.loads(given.text)
        except ValueError as exc:
            return f"json_schema is not JSON: {exc}"
        if not isinstance(schema, dict):
            return "json_schema must be a JSON object (a schema document)"
    try:
        grammar = given.grammar()
    except ValueError as exc:
        return str(exc)
    key = grammar_key(grammar)
    with _problems_lock:
        known = _problems.get(key)
    if known is None:
        # Compiles the grammar (lexer and parser tables) without a tokenizer.
        known = LLMatcher.validate_grammar(grammar)
        with _problems_lock:
            _problems[key] = known
    return known or None


def grammar_key(grammar: str) -> bytes:
    """A cache key for a grammar: its digest, so a cache of big formats stays small."""
    return hashlib.sha256(grammar.encode()).digest()
