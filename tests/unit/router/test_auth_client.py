"""The router's auth client against a real (test-double) AuthService on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb

from services.common.errors import Unauthenticated, Unavailable
from services.router.auth_client import AuthClient, bearer_credential, model_matches
from tests.conftest import eventually
from tests.doubles.fake_auth import FakeAuth, principal

KEY = "ty_sk_aaaaaaaaaaaaaaaaaaaaaaaaaaaa"


@pytest.fixture
async def auth() -> AsyncIterator[FakeAuth]:
    server = FakeAuth()
    await server.start()
    server.state.add_key(KEY, principal("cred-a", models=("smollm2-*", "exact-model")))
    yield server
    await server.stop()


@pytest.fixture
async def client(auth: FakeAuth) -> AsyncIterator[AuthClient]:
    channel = grpc.aio.insecure_channel(auth.address)
    c = AuthClient(channel, failure_ttl=30.0)
    yield c
    await c.close()
    await channel.close()


def test_bearer_header_parsing() -> None:
    assert bearer_credential(f"Bearer {KEY}") == KEY
    assert bearer_credential(f"bearer  {KEY}") == KEY
    for bad in (None, "", "Bearer", "Basic abc", f"Token {KEY}", "Bearer " + "x" * 600):
        with pytest.raises(Unauthenticated) as info:
            bearer_credential(bad)
        assert info.value.message == Unauthenticated().message


def test_model_patterns() -> None:
    assert model_matches("*", "anything")
    assert model_matches("smollm2-*", "smollm2-135m")
    assert not model_matches("smollm2-*", "llama-3")
    assert model_matches("exact", "exact") and not model_matches("exact", "exact-2")


async def test_principal_is_cached(auth: FakeAuth, client: AuthClient) -> None:
    first = await client.authenticate(KEY)
    second = await client.authenticate(KEY)
    assert first is second
    assert first.may_use("smollm2-135m") and not first.may_use("llama")
    assert auth.state.authenticate_calls == 1


async def test_concurrent_requests_share_one_call(auth: FakeAuth, client: AuthClient) -> None:
    auth.state.authenticate_delay = 0.2
    results = await asyncio.gather(*(client.authenticate(KEY) for _ in range(50)))
    assert {r.credential_id for r in results} == {"cred-a"}
    assert auth.state.authenticate_calls == 1


async def test_unknown_key_is_rejected_and_remembered(auth: FakeAuth, client: AuthClient) -> None:
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await client.authenticate("ty_sk_unknown")
    assert auth.state.authenticate_calls == 1


async def test_auth_down_keeps_cached_principals_and_fails_closed(
    auth: FakeAuth, client: AuthClient
) -> None:
    await client.authenticate(KEY)
    await auth.stop()
    assert (await client.authenticate(KEY)).credential_id == "cred-a"
    with pytest.raises(Unavailable):
        await client.authenticate("ty_sk_never_seen")


async def test_expired_cache_entry_is_not_used_when_auth_is_down(auth: FakeAuth) -> None:
    auth.state.cache_ttl = 5.0
    now = [1000.0]
    channel = grpc.aio.insecure_channel(auth.address)
    c = AuthClient(channel, clock=lambda: now[0])
    try:
        await c.authenticate(KEY)
        await auth.stop()
        now[0] += 5.1  # past the entry's time-to-live
        with pytest.raises(Unavailable):
            await c.authenticate(KEY)
    finally:
        await channel.close()


async def test_revocation_applies_at_once(auth: FakeAuth, client: AuthClient) -> None:
    client.start()
    await client.revocations_connected.wait()
    await client.authenticate(KEY)
    auth.state.revoke(KEY)
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        try:
            await client.authenticate(KEY)
        except Unauthenticated:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("revoked key still accepted")


async def test_a_request_after_a_revocation_never_joins_a_call_from_before(
    auth: FakeAuth, client: AuthClient
) -> None:
    client.start()
    await client.revocations_connected.wait()
    auth.state.authenticate_delay = 0.3
    before = asyncio.create_task(client.authenticate(KEY))  # auth read the key valid
    await eventually(lambda: auth.state.authenticate_calls == 1, what="call in flight")
    epoch = client._epoch
    auth.state.revoke(KEY)
    await eventually(lambda: client._epoch > epoch, what="revocation applied")
    with pytest.raises(Unauthenticated):
        await client.authenticate(KEY)  # asks auth again rather than joining
    assert (await before).credential_id == "cred-a"  # began before: answered as then
    with pytest.raises(Unauthenticated):
        await client.authenticate(KEY)  # and that answer was not cached


async def test_reconnect_drops_the_cache(auth: FakeAuth, client: AuthClient) -> None:
    client.start()
    await client.revocations_connected.wait()
    await client.authenticate(KEY)
    await auth.stop()
    await eventually(lambda: not client.revocations_connected.is_set())
    await auth.start()
    await client.revocations_connected.wait()
    calls = auth.state.authenticate_calls
    await client.authenticate(KEY)
    assert auth.state.authenticate_calls == calls + 1


async def test_a_full_cache_evicts_the_least_recent_and_revocations_still_apply(
    auth: FakeAuth,
) -> None:
    """At capacity one entry makes room (not the whole cache); the revocation index
    forgets evicted entries, and a revocation still drops the cached ones."""
    keys = [f"ty_sk_{c * 28}" for c in "bcd"]
    for i, key in enumerate(keys):
        auth.state.add_key(key, principal(f"cred-{i}"))
    channel = grpc.aio.insecure_channel(auth.address)
    c = AuthClient(channel, max_cached=2)
    try:
        for key in keys:
            await c.authenticate(key)
        assert auth.state.authenticate_calls == 3
        await c.authenticate(keys[2])  # still cached
        assert auth.state.authenticate_calls == 3
        assert set(c._index.by_credential) == {"cred-1", "cred-2"}  # cred-0 was evicted
        await c.authenticate(keys[0])  # evicted: asks auth again
        assert auth.state.authenticate_calls == 4
        auth.state.revoke(keys[2])
        c.apply_revocation(auth_pb.WatchRevocationsResponse(credential_ids=["cred-2"]))
        with pytest.raises(Unauthenticated):
            await c.authenticate(keys[2])
    finally:
        await channel.close()
