"""response_format rules (services.common.requests): checked with llguidance, no model."""

from __future__ import annotations

import json

import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import InvalidArgument
from services.common.grammars import ResponseFormat
from services.common.requests import MAX_RESPONSE_FORMAT_BYTES, generation_request


def checked(**fmt: object) -> ResponseFormat | None:
    request = gen.StreamGenerateRequest(
        model="m",
        prompt="p",
        response_format=gen.ResponseFormat(**fmt),  # type: ignore[arg-type]
    )
    return generation_request(request, from_caller=True).response_format


def refused(**fmt: object) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        checked(**fmt)
    assert info.value.field is not None and info.value.field.startswith("response_format")
    return info.value


def test_no_format_is_free_text() -> None:
    request = gen.StreamGenerateRequest(model="m", prompt="p")
    assert generation_request(request, from_caller=True).response_format is None


@pytest.mark.parametrize(
    ("fmt", "kind"),
    [
        ({"json_schema": json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})},
         "json_schema"),
        ({"json_object": True}, "json_object"),
        ({"regex": r"[0-9]{3}-[a-z]+"}, "regex"),
        ({"grammar": 'start: "yes" | "no"'}, "grammar"),
    ],
)  # fmt: skip
def test_each_kind_is_accepted(fmt: dict[str, object], kind: str) -> None:
    given = checked(**fmt)
    assert given is not None and given.kind == kind
    assert given.grammar()  # an llguidance grammar, the cache key


@pytest.mark.parametrize(
    ("fmt", "reason"),
    [
        ({"json_schema": "{not json"}, "not JSON"),
        ({"json_schema": "[1, 2]"}, "JSON object"),
        ({"json_schema": '{"type": "objekt"}'}, "objekt"),
        ({"json_schema": '{"type": "string", "format": "no-such-format"}'}, "no-such-format"),
        ({"json_schema": '{"$ref": "#/$defs/missing"}'}, "missing"),
        ({"regex": "[a-z"}, "unclosed character class"),
        ({"grammar": 'start: "a" | undefined_rule'}, "undefined_rule"),
        ({"json_schema": ""}, "must not be empty"),
        ({"json_object": False}, "must be true"),
    ],
)
def test_a_bad_format_is_refused_with_the_library_reason(
    fmt: dict[str, object], reason: str
) -> None:
    error = refused(**fmt)
    assert reason in error.message


def test_an_empty_response_format_names_the_choices() -> None:
    request = gen.StreamGenerateRequest(model="m", prompt="p")
    request.response_format.SetInParent()
    with pytest.raises(InvalidArgument) as info:
        generation_request(request, from_caller=True)
    assert info.value.field == "response_format"
    assert "json_schema" in info.value.message


def test_the_size_cap_holds_for_every_kind() -> None:
    # A valid but oversized format: the cap is checked before llguidance sees it.
    big = "a" * (MAX_RESPONSE_FORMAT_BYTES + 1)
    for kind, text in (
        ("regex", big),
        ("grammar", f'start: "{big}"'),
        ("json_schema", json.dumps({"const": big})),
    ):
        error = refused(**{kind: text})
        assert error.field == f"response_format.{kind}"
        assert str(MAX_RESPONSE_FORMAT_BYTES) in error.message
    # Multi-byte characters count as bytes, not characters.
    error = refused(regex="é" * (MAX_RESPONSE_FORMAT_BYTES // 2 + 1))
    assert error.field == "response_format.regex"


async def test_the_format_compiles_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 64 KiB schema can take most of a second to compile: never on the loop's thread.
    import threading

    from services.common import requests

    seen: list[threading.Thread] = []

    def spy(given: ResponseFormat) -> str | None:
        seen.append(threading.current_thread())
        return None

    monkeypatch.setattr(requests, "format_problem", spy)
    request = gen.StreamGenerateRequest(
        model="m", prompt="p", response_format=gen.ResponseFormat(regex="[a-z]+")
    )
    checked = await requests.generation_request_off_loop(request, from_caller=True)
    assert checked.response_format == ResponseFormat("regex", "[a-z]+")
    assert seen and seen[0] is not threading.main_thread()
