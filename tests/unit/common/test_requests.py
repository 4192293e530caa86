"""The one home of the request rules: what it builds, and the rules that drifted before."""

from __future__ import annotations

import dataclasses

import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import InvalidArgument
from services.common.requests import (
    MAX_REQUEST_ID,
    MAX_STOP_TOKEN_IDS,
    Sampling,
    generation_request,
    page_size_of,
    sampling_of,
    valid_request_id,
)


def test_unset_sampling_fields_take_the_defaults() -> None:
    assert sampling_of(gen.SamplingParams(), None) == Sampling()


def test_every_set_sampling_field_is_carried() -> None:
    params = gen.SamplingParams(
        max_tokens=7,
        temperature=0.5,
        top_p=0.25,
        top_k=3,
        min_p=0.125,
        repetition_penalty=1.5,
        seed=99,
        stop=["a", "b"],
        stop_token_ids=[4, 5],
        ignore_eos=True,
    )
    got = sampling_of(params, 2)
    expected = Sampling(7, 0.5, 0.25, 3, 0.125, 1.5, 99, ("a", "b"), frozenset({4, 5}), True, 2)
    assert got == expected
    # Every field of Sampling is set to something other than its default above.
    assert all(getattr(got, f.name) != f.default for f in dataclasses.fields(Sampling))


def test_stop_token_ids_are_counted_as_sent_not_as_distinct() -> None:
    params = gen.SamplingParams(stop_token_ids=[5] * (MAX_STOP_TOKEN_IDS + 1))
    with pytest.raises(InvalidArgument) as caught:
        sampling_of(params, None)
    assert caught.value.field == "sampling.stop_token_ids"


def test_continuation_is_refused_from_callers_and_kept_for_the_worker() -> None:
    request = gen.StreamGenerateRequest(model="m", prompt="p", continuation_token_ids=[1, 2])
    with pytest.raises(InvalidArgument) as caught:
        generation_request(request, from_caller=True)
    assert caught.value.field == "continuation_token_ids"
    assert generation_request(request, from_caller=False).continuation_ids == (1, 2)


@pytest.mark.parametrize(
    ("request_id", "valid"),
    [("r" * MAX_REQUEST_ID, True), ("r" * (MAX_REQUEST_ID + 1), False), ("a\nb", False)],
)
def test_one_request_id_rule_for_the_field_and_the_header(request_id: str, valid: bool) -> None:
    assert valid_request_id(request_id) is valid
    request = gen.StreamGenerateRequest(model="m", prompt="p", request_id=request_id)
    if valid:
        assert generation_request(request, from_caller=True).request_id == request_id
    else:
        with pytest.raises(InvalidArgument, match=f"at most {MAX_REQUEST_ID} printable"):
            generation_request(request, from_caller=True)


def test_page_size_zero_is_the_default_and_over_the_maximum_is_the_maximum() -> None:
    assert (page_size_of(0), page_size_of(7), page_size_of(10**6)) == (100, 7, 1000)
    with pytest.raises(InvalidArgument, match="page_size"):
        page_size_of(-1)


def test_priority_range_and_tenant_only_from_the_router() -> None:
    from services.common.requests import MAX_PRIORITY, MIN_PRIORITY

    for priority in (MIN_PRIORITY, -1, 0, MAX_PRIORITY):
        req = gen.StreamGenerateRequest(model="m", prompt="p", priority=priority, tenant="u1")
        from_caller = generation_request(req, from_caller=True)
        assert (from_caller.priority, from_caller.tenant) == (priority, "")  # tenant ignored
        assert generation_request(req, from_caller=False).tenant == "u1"  # the router's
    for priority in (MIN_PRIORITY - 1, MAX_PRIORITY + 1):
        req = gen.StreamGenerateRequest(model="m", prompt="p", priority=priority)
        with pytest.raises(InvalidArgument) as bad:
            generation_request(req, from_caller=True)
        assert bad.value.field == "priority"
    bad_tenant = gen.StreamGenerateRequest(model="m", prompt="p", tenant="x\n")
    assert generation_request(bad_tenant, from_caller=True).tenant == ""  # ignored, not refused
    with pytest.raises(InvalidArgument) as bad:
        generation_request(bad_tenant, from_caller=False)
    assert bad.value.field == "tenant"
