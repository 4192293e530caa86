"""Incremental detokenization and stop-string matching."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.inference.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.inference.model_loading import LoadedModel

TEXTS = [
    "你好\uff0c世界\uff01今天天气很好。",
    "Emoji are fun 😀🎉🚀 yes",
    "café naïve über",
    "plain ascii text",
]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_deltas_rebuild_the_text(tiny: LoadedModel, text: str) -> None:
    tok = tiny.tokenizer
    ids = tok(text)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.feed([i]) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_characters_are_split_across_tokens(tiny: LoadedModel) -> None:
    # The premise of the tests above: some tokens alone are not valid UTF-8.
    tok = tiny.tokenizer
    ids = tok("😀🎉")["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.feed([i]) for i in ids]
    assert "" in deltas  # held back while a character was incomplete
    assert "".join(deltas) == "😀🎉"


def test_prompt_context_and_batched_feed(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    prompt = tok("The capital of France is")["input_ids"]
    answer = tok(" Paris. 你好")["input_ids"]
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.feed(answer[:3]) + detok.feed(answer[3:]) + detok.flush() == " Paris. 你好"


def test_flush_releases_an_incomplete_character(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    ids = tok("a😀")["input_ids"]
    detok = IncrementalDetokenizer(tok)
    text = detok.feed(ids[:-1])
    assert text == "a"
    assert detok.flush().startswith("\ufffd")  # the partial emoji, visibly incomplete
    assert detok.flush() == ""


def test_skip_special_tokens(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    ids = [*tok("hi")["input_ids"], tok.eos_token_id]
    assert IncrementalDetokenizer(tok).feed(ids) == "hi"
    assert (
        IncrementalDetokenizer(tok, skip_special_tokens=False).feed(ids).endswith("<|endoftext|>")
    )


def run(matcher: StopStringMatcher, deltas: list[str]) -> str:
    return "".join(matcher.feed(d) for d in deltas) + matcher.flush()


def test_stop_string_across_deltas() -> None:
    m = StopStringMatcher(["</answer>"])
    out = [m.feed(d) for d in ["The answer is 4", "</ans", "wer> trailing"]]
    assert out == ["The answer is 4", "", ""]
    assert m.stopped == "</answer>" and m.flush() == ""


def test_partial_match_is_held_then_released() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == "abc "
    assert m.feed("OP") == ""
    assert m.stopped == "STOP"
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == "abc "
    assert m.feed("ART") == "START"
    assert m.flush() == "" and m.stopped is None
    m = StopStringMatcher(["STOP"])
    assert m.feed("end S") == "end "
    assert m.flush() == "S"


def test_the_stop_string_that_completes_first_wins() -> None:
    # Generation ends the moment a stop string appears: "Use" is complete before "User:".
    m = StopStringMatcher(["\n\n", "User:", "Use"])
    assert run(m, ["Hello Us", "er: hi\n\n"]) == "Hello "
    assert m.stopped == "Use"
    # The same answer whatever the cuts: "O" completes before "POO" does.
    for deltas in (["POO"], ["PO", "O"], ["P", "O", "O"]):
        m = StopStringMatcher(["O", "POO"])
        assert run(m, deltas) == "P"
        assert m.stopped == "O"


def test_emoji_and_chinese_stops() -> None:
    m = StopStringMatcher(["🛑", "结束"])
    assert run(m, ["好的", "结", "束了"]) == "好的"
    assert m.stopped == "结束"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abS TOP你好😀", max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
    stops=st.lists(st.text(alphabet="abSTOP好😀", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_matcher_equals_whole_text_search(
    text: str, cuts: list[int], stops: list[str]
) -> None:
    # Whatever the delta boundaries, the output is the text up to the stop string
    # that completes first (equal ends: the longest).
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    m = StopStringMatcher(stops)
    emitted = run(m, deltas)
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[: min(hits)[1]] if hits else text
    assert emitted == expected
    assert (m.stopped is not None) == bool(hits)


class _SlowTokenizer:
    """The same tokenizer without its Rust backend: forces the re-decoding window."""

    def __init__(self, tokenizer: object) -> None:
        self._inner = tokenizer

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return str(self._inner.decode(ids, **kwargs))  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_decode_stream_gives_the_window_decoders_deltas_token_for_token(
    tiny: LoadedModel, data: st.DataObject
) -> None:
    """The fast path (DecodeStream) and the window path emit identical deltas, on text
    and on arbitrary token ids (partial characters, special tokens, odd spacing)."""
    tok = tiny.tokenizer
    vocab = len(tok)
    text = data.draw(st.sampled_from([*TEXTS, " two  spaces\tand\nlines ", "🙂👍🏽 日本語"]))
    ids = data.draw(
        st.one_of(
            st.just(tok(text, add_special_tokens=False)["input_ids"]),
            st.lists(st.integers(0, vocab - 1), max_size=40),
        )
    )
    prompt = tok("Say:")["input_ids"]
    fast, window = (
        IncrementalDetokenizer(tok, prompt),
        IncrementalDetokenizer(_SlowTokenizer(tok), prompt),
    )
    assert fast._stream is not None and window._stream is None
    for token_id in ids:
        assert fast.feed([token_id]) == window.feed([token_id]), token_id
    assert fast.flush() == window.flush()
