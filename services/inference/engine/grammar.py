"""Structured output in the engine: compiled grammars, per-sample matchers, token masks.

A grammar (an llguidance grammar string, see `services.common.grammars`) compiles
once per tokenizer on a thread of its own, never the compute thread; the result is
cached by the grammar's digest. Each sample gets its own matcher, a copy of the
compiled one, which the compute thread advances token by token. Before sampling,
one bitmask per step covers the whole batch: constrained rows get their grammar's
allowed tokens, unconstrained rows keep every token, so both share a batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import llguidance
import llguidance.hf
import torch
from cachetools import LRUCache

from services.common.grammars import grammar_key

CACHED_GRAMMARS = 256


class GrammarError(ValueError):
    """A grammar that cannot constrain this model's tokens; the message is llguidance's."""


class CompiledGrammar:
    """A grammar compiled for one tokenizer; `start` gives a sample its own matcher."""

    def __init__(self, matcher: Any) -> None:
        self._template = matcher  # never advanced: only copied

    def start(self, continuation: Sequence[int] = ()) -> Any:
        """A fresh matcher, past `continuation` (tokens an earlier attempt produced)."""
        matcher = self._template.deep_copy()
        if continuation and not matcher.consume_tokens(list(continuation)):
            raise GrammarError(f"the tokens do not follow the format: {matcher.get_error()}")
        return matcher


class Grammars:
    """Compiles grammars for one tokenizer, caches them, and builds the step's masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int] = ()) -> None:
        self.vocab_size = vocab_size
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)
        self._llg_tokenizer: Any = None  # built on first use (about a second)
        self._executor: Any = None
        self._lock = threading.Lock()
        self._cache: LRUCache[bytes, CompiledGrammar] = LRUCache(maxsize=CACHED_GRAMMARS)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")

    def prepare(self) -> None:
        """Build the tokenizer's token trie now, on the grammar thread (about a second),
        so the first structured request does not wait for it."""
        self._pool.submit(self._tokenizer)

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._llg_tokenizer is None:
                self._llg_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None
                )
            return self._llg_tokenizer

    def compile(self, grammar: str) -> CompiledGrammar:
        """The compiled grammar (cached); raises GrammarError with llguidance's reason."""
        key = grammar_key(grammar)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if not matcher.is_error():
            # The first mask builds the lexer's start states: here, not on the compute thread.
            bitmask = self._bitmask(1)
            matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        compiled = CompiledGrammar(matcher)
        with self._lock:
            self._cache[key] = compiled
        return compiled

    async def compile_async(self, grammar: str) -> CompiledGrammar:
        """`compile` on the grammar thread: the caller waits, nothing else does."""
        with self._lock:
            cached = self._cache.get(grammar_key(grammar))
        if cached is not None:
            return cached
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.compile, grammar)

    def allowed(self, matchers: Sequence[Any | None], device: torch.device) -> torch.Tensor | None:
        """Which tokens each row may take (``[rows, vocab]`` bool); None when no row is constrained.

        Rows without a matcher allow every token, so their sampling is unchanged.
        """
        constrained = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not constrained:
            return None
        bitmask = self._bitmask(len(matchers))
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        words = bitmask.shape[1]
        # llguidance writes each constrained row's mask in place (rows in parallel).
        self._executor.unsafe_compute_mask_ptr(
            constrained, bitmask.data_ptr(), words * 4, len(matchers)
        )
        bits = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, : self.vocab_size]
        return allowed.to(device)

    def forget(self) -> None:
        """Drop every compiled grammar (the bench times cold compiles with it)."""
        with self._lock:
            self._cache.clear()

    def _bitmask(self, rows: int) -> torch.Tensor:
        """One bit per token and row, every token allowed (llguidance's layout).

        Not `llguidance.torch`: importing it compiles a kernel with torch.compile.
        """
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def close(self) -> None:
        """Stop the grammar thread (pending compiles are dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
