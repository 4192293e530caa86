"""Incremental detokenization and stop-string matching for streamed text.

Pure Python over a transformers tokenizer; the servicer layer uses these to turn the
engine's token events into text deltas. Decoding token by token is wrong for byte-
level and SentencePiece tokenizers (a character may span tokens; spaces depend on
the previous token), so the detokenizer re-decodes a short window instead: the
prefix_offset/read_offset technique of text-generation-inference and vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Feed generated token ids; get text deltas that never split a UTF-8 character.

    `prompt_ids` (optional) seed the decoding window, so the first generated token gets
    the same leading-space treatment as in a full decode. Fast (Rust) tokenizers
    decode through `tokenizers.decoders.DecodeStream` (the same deltas, ~5x less
    work per token on the worker's event loop); others re-decode a short window.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        backend = getattr(tokenizer, "_tokenizer", None)
        self._fast: Any = backend if isinstance(backend, Tokenizer) else None
        self._stream = (
            DecodeStream(ids=list(self._ids), skip_special_tokens=skip_special_tokens)
            if self._fast is not None
            else None
        )

    def _decode(self, ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(
            list(ids),
            skip_special_tokens=self._skip_special,
            clean_up_tokenization_spaces=False,
        )
        return text

    def feed(self, token_ids: Iterable[int]) -> str:
        """Add tokens; return the text they complete (may be empty while a character is partial)."""
        out: list[str] = []
        for token_id in token_ids:
            self._ids.append(token_id)
            if self._stream is not None:
                chunk = self._stream.step(self._fast, token_id)
                if chunk:
                    out.append(chunk)
                    # The window flush() decodes starts after what was emitted.
                    self._prefix_offset = max(0, len(self._ids) - _CONTEXT_TOKENS - 1)
                    self._read_offset = len(self._ids)
                continue
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            new_text = self._decode(self._ids[self._prefix_offset :])
            if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
                out.append(new_text[len(prefix_text) :])
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
        return "".join(out)

    def flush(self) -> str:
        """Text held back at the end of a stream (an incomplete character shows as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopStringMatcher:
    """Finds stop strings in streamed text, even across deltas, and never emits one.

    `feed` returns the text that is safe to emit; text that could be the start of a
    stop string is held back until it is ruled out. Once a stop string is found,
    `stopped` names it, the text before it has been emitted, and later input is ignored.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = sorted({s for s in stops if s}, key=len, reverse=True)
        self._held = ""
        self.stopped: str | None = None

    def _hold_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def feed(self, delta: str) -> str:
        """Add `delta`; return the text that can be emitted now."""
        if self.stopped is not None:
            return ""
        text = self._held + delta
        # The stop string that completes first wins (as it would while generating:
        # generation ends the moment any stop string appears), so the result does
        # not depend on where the deltas were cut; equal ends pick the longest.
        found, found_end = -1, -1
        for stop in self._stops:
            index = text.find(stop)
            end = index + len(stop)
            if index != -1 and (found == -1 or end < found_end):
                found, found_end, self.stopped = index, end, stop
        if found != -1:
            self._held = ""
            return text[:found]
        hold = self._hold_length(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """At the end of the stream: release held-back text (no stop string completed)."""
        held, self._held = self._held, ""
        return "" if self.stopped is not None else held
