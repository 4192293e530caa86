"""API keys: shown once, listed by hint, expiry, rotation, revocation, narrowing."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from sqlalchemy.orm import Session
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2

from services.auth.app import AuthApp
from services.auth.db.engine import Database
from services.auth.db.models import ApiKeyRow
from services.auth.settings import AuthSettings
from tests.integration.auth.conftest import Auth, running
from tests.integration.auth.helpers import expect, make_user, md

UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def ts(when: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


async def authenticate(svc: Auth, key: str) -> resources_pb2.Principal:
    reply = await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=key))
    out: resources_pb2.Principal = reply.principal
    return out


async def test_key_is_shown_once_listed_by_hint_and_revocable(svc: Auth) -> None:
    made = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="ci", request_id="req-1"), metadata=svc.admin
    )
    secret = made.secret
    assert secret.startswith("ty_sk_") and len(secret) >= 6 + 22
    assert made.api_key.hint == f"ty_sk_…{secret[-4:]}"
    again = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="ci", request_id="req-1"), metadata=svc.admin
    )
    assert again.secret == "" and again.api_key.key_id == made.api_key.key_id
    listed = await svc.keys.ListApiKeys(keys_pb.ListApiKeysRequest(), metadata=svc.admin)
    assert made.api_key.key_id in {k.key_id for k in listed.api_keys}
    assert secret not in str(listed)
    assert (await authenticate(svc, secret)).credential_id == made.api_key.key_id

    watch = svc.auth.WatchRevocations(auth_pb.WatchRevocationsRequest())
    first = await watch.read()
    assert first.reset
    revoked = await svc.keys.RevokeApiKey(
        keys_pb.RevokeApiKeyRequest(key_id=made.api_key.key_id), metadata=svc.admin
    )
    assert revoked.api_key.HasField("revoke_time")
    pushed = await asyncio.wait_for(watch.read(), 10)
    assert made.api_key.key_id in pushed.credential_ids
    watch.cancel()
    await expect(authenticate(svc, secret), UNAUTH, "invalid or missing credential")
    listed = await svc.keys.ListApiKeys(keys_pb.ListApiKeysRequest(), metadata=svc.admin)
    assert made.api_key.key_id not in {k.key_id for k in listed.api_keys}
    inactive = await svc.keys.ListApiKeys(
        keys_pb.ListApiKeysRequest(show_inactive=True), metadata=svc.admin
    )
    assert made.api_key.key_id in {k.key_id for k in inactive.api_keys}
    await svc.keys.DeleteApiKey(
        keys_pb.DeleteApiKeyRequest(key_id=made.api_key.key_id), metadata=svc.admin
    )
    await expect(
        svc.keys.GetApiKey(
            keys_pb.GetApiKeyRequest(key_id=made.api_key.key_id), metadata=svc.admin
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_expired_key_is_refused(svc: Auth) -> None:
    await expect(
        svc.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(
                name="old", expire_time=ts(datetime.now(UTC) - timedelta(minutes=1))
            ),
            metadata=svc.admin,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expire_time",
    )
    made = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(
            name="short", expire_time=ts(datetime.now(UTC) + timedelta(hours=1))
        ),
        metadata=svc.admin,
    )
    principal = await authenticate(svc, made.secret)
    assert principal.HasField("expire_time")
    # The hour passes: move the stored expiry into the past instead of waiting.
    _expire_now(svc.settings.database_url, made.api_key.key_id)
    await expect(authenticate(svc, made.secret), UNAUTH)


def _expire_now(database_url: str, key_id: str) -> None:
    db = Database(database_url)
    try:
        with Session(db.engine) as session, session.begin():
            row = session.get(ApiKeyRow, key_id)
            assert row is not None
            row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    finally:
        db.close()


async def test_rotation_keeps_the_old_key_for_the_grace_period(svc: Auth) -> None:
    made = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="svc", permissions=["generate"]), metadata=svc.admin
    )
    rotated = await svc.keys.RotateApiKey(
        keys_pb.RotateApiKeyRequest(
            key_id=made.api_key.key_id, grace_period=duration_pb2.Duration(seconds=3600)
        ),
        metadata=svc.admin,
    )
    assert rotated.secret and rotated.secret != made.secret
    assert rotated.api_key.rotated_from_key_id == made.api_key.key_id
    assert list(rotated.api_key.permissions) == ["generate"]
    assert rotated.previous_api_key.HasField("expire_time")
    assert (await authenticate(svc, made.secret)).credential_id == made.api_key.key_id
    assert (await authenticate(svc, rotated.secret)).credential_id == rotated.api_key.key_id
    now = await svc.keys.RotateApiKey(
        keys_pb.RotateApiKeyRequest(
            key_id=rotated.api_key.key_id, grace_period=duration_pb2.Duration(seconds=0)
        ),
        metadata=svc.admin,
    )
    await expect(authenticate(svc, rotated.secret), UNAUTH)
    assert (await authenticate(svc, now.secret)).permissions == ["generate"]
    await expect(
        svc.keys.RotateApiKey(
            keys_pb.RotateApiKeyRequest(key_id=rotated.api_key.key_id), metadata=svc.admin
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_key_narrows_permissions_models_and_limits(svc: Auth) -> None:
    limits = resources_pb2.Limits(requests_per_minute=100, token_quota=5000)
    _, key = await make_user(
        svc,
        "erin",
        ["generate", "keys.manage_own", "models.list"],
        models=["smol-*"],
        limits=limits,
    )
    narrow = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(
            name="narrow",
            permissions=["generate"],
            allowed_models=["smol-135m"],
            limits=resources_pb2.Limits(requests_per_minute=10, tokens_per_minute=1000),
        ),
        metadata=md(key),
    )
    p = await authenticate(svc, narrow.secret)
    assert list(p.permissions) == ["generate"]
    assert list(p.allowed_models) == ["smol-135m"]
    assert p.limits.requests_per_minute == 10
    assert p.limits.tokens_per_minute == 1000
    assert p.limits.token_quota == 5000
    assert p.limits.quota_period == resources_pb2.QUOTA_PERIOD_DAY
    # Wider than the owner: refused, naming what was asked.
    await expect(
        svc.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(name="wide", permissions=["users.admin"]), metadata=md(key)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "users.admin",
    )
    await expect(
        svc.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(name="wide", allowed_models=["*"]), metadata=md(key)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "'*'",
    )
    # A narrowed key cannot manage keys at all, nor mint a wider one.
    await expect(
        svc.keys.CreateApiKey(keys_pb.CreateApiKeyRequest(name="x"), metadata=md(narrow.secret)),
        grpc.StatusCode.PERMISSION_DENIED,
        "keys.manage_own",
    )


async def test_an_admin_key_holds_every_permission(svc: Auth) -> None:
    made = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="adm", permissions=["admin"]), metadata=svc.admin
    )
    assert {"admin", "users.admin", "audit.read"} <= set(
        (await authenticate(svc, made.secret)).permissions
    )


async def test_key_made_with_a_narrowed_key_stays_narrow(svc: Auth) -> None:
    _, key = await make_user(svc, "fay", ["generate", "keys.manage_own", "models.list"])
    narrowed = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="n", permissions=["generate", "keys.manage_own"]),
        metadata=md(key),
    )
    child = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="child"), metadata=md(narrowed.secret)
    )
    p = await authenticate(svc, child.secret)
    assert set(p.permissions) == {"generate", "keys.manage_own"}


async def test_users_cannot_see_or_touch_each_others_keys(svc: Auth) -> None:
    a_id, a_key = await make_user(svc, "gina", ["keys.manage_own"])
    b_id, b_key = await make_user(svc, "hank", ["keys.manage_own"])
    b_keys = await svc.keys.ListApiKeys(keys_pb.ListApiKeysRequest(), metadata=md(b_key))
    b_key_id = b_keys.api_keys[0].key_id
    await expect(
        svc.keys.ListApiKeys(keys_pb.ListApiKeysRequest(user_id=b_id), metadata=md(a_key)),
        grpc.StatusCode.PERMISSION_DENIED,
        "keys.admin",
    )
    for call in (
        svc.keys.GetApiKey(keys_pb.GetApiKeyRequest(key_id=b_key_id), metadata=md(a_key)),
        svc.keys.RevokeApiKey(keys_pb.RevokeApiKeyRequest(key_id=b_key_id), metadata=md(a_key)),
        svc.keys.RotateApiKey(keys_pb.RotateApiKeyRequest(key_id=b_key_id), metadata=md(a_key)),
    ):
        await expect(call, grpc.StatusCode.NOT_FOUND, "api key not found")
    await expect(
        svc.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(user_id=b_id, name="x"), metadata=md(a_key)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert (await authenticate(svc, b_key)).user_id == b_id
    assert a_id != b_id


async def test_update_key_changes_masked_fields_only(svc: Auth) -> None:
    made = await svc.keys.CreateApiKey(keys_pb.CreateApiKeyRequest(name="a"), metadata=svc.admin)
    updated = await svc.keys.UpdateApiKey(
        keys_pb.UpdateApiKeyRequest(
            api_key=resources_pb2.ApiKey(
                key_id=made.api_key.key_id, name="b", permissions=["generate"]
            ),
            update_mask={"paths": ["name"]},
        ),
        metadata=svc.admin,
    )
    assert updated.api_key.name == "b" and list(updated.api_key.permissions) == []
    await expect(
        svc.keys.UpdateApiKey(
            keys_pb.UpdateApiKeyRequest(
                api_key=resources_pb2.ApiKey(key_id=made.api_key.key_id),
                update_mask={"paths": ["digest"]},
            ),
            metadata=svc.admin,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "update_mask",
    )


async def test_cached_principal_is_dropped_on_revoke(settings: AuthSettings, svc: Auth) -> None:
    cached = dataclasses.replace(settings, principal_cache_ttl=60.0)
    async with running(cached) as (app, channel):
        other = Auth(app, cached, channel, svc.admin_key)
        made = await other.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(name="c"), metadata=other.admin
        )
        await authenticate(other, made.secret)
        await other.keys.RevokeApiKey(
            keys_pb.RevokeApiKeyRequest(key_id=made.api_key.key_id), metadata=other.admin
        )
        await expect(authenticate(other, made.secret), UNAUTH)


async def test_revocation_on_one_replica_reaches_the_other(
    settings: AuthSettings, svc: Auth
) -> None:
    cached = dataclasses.replace(settings, principal_cache_ttl=60.0)
    async with running(cached) as (app_b, channel_b):
        b = Auth(app_b, cached, channel_b, svc.admin_key)
        made = await svc.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(name="r"), metadata=svc.admin
        )
        await authenticate(b, made.secret)  # now cached on replica b for a minute
        watch = b.auth.WatchRevocations(auth_pb.WatchRevocationsRequest())
        assert (await watch.read()).reset
        await svc.keys.RevokeApiKey(
            keys_pb.RevokeApiKeyRequest(key_id=made.api_key.key_id), metadata=svc.admin
        )
        pushed = await asyncio.wait_for(watch.read(), 10)
        assert made.api_key.key_id in pushed.credential_ids
        watch.cancel()
        await expect(authenticate(b, made.secret), UNAUTH)


async def test_last_used_time_is_written_in_batches(svc: Auth) -> None:
    made = await svc.keys.CreateApiKey(keys_pb.CreateApiKeyRequest(name="u"), metadata=svc.admin)
    await authenticate(svc, made.secret)
    got = await svc.keys.GetApiKey(
        keys_pb.GetApiKeyRequest(key_id=made.api_key.key_id), metadata=svc.admin
    )
    assert not got.api_key.HasField("last_used_time")  # not written on the call itself
    await svc.app.core.last_used.flush()
    got = await svc.keys.GetApiKey(
        keys_pb.GetApiKeyRequest(key_id=made.api_key.key_id), metadata=svc.admin
    )
    assert got.api_key.HasField("last_used_time")


async def test_old_pepper_still_accepted_and_key_moves_to_the_new_one(
    settings: AuthSettings, svc: Auth
) -> None:
    made = await svc.keys.CreateApiKey(keys_pb.CreateApiKeyRequest(name="p"), metadata=svc.admin)
    assert settings.key_pepper is not None
    rotated = dataclasses.replace(
        settings,
        key_pepper="a-brand-new-pepper-0000",
        key_pepper_version=2,
        old_key_peppers=((1, settings.key_pepper),),
    )
    async with running(rotated) as (app, channel):
        other = Auth(app, rotated, channel, svc.admin_key)
        assert (await authenticate(other, made.secret)).credential_id == made.api_key.key_id
        version = await app.core.db.read(lambda s: _hash_version(s, made.api_key.key_id))
        assert version == 2
    only_new = dataclasses.replace(rotated, old_key_peppers=())
    async with running(only_new) as (app, channel):
        other = Auth(app, only_new, channel, svc.admin_key)
        assert (await authenticate(other, made.secret)).credential_id == made.api_key.key_id


def _hash_version(session: object, key_id: str) -> int:
    from services.auth.db.models import ApiKeyRow

    row = session.get(ApiKeyRow, key_id)  # type: ignore[attr-defined]
    return int(row.hash_version)


_ = AuthApp


async def test_a_revocation_committed_late_with_a_lower_id_is_still_pushed(svc: Auth) -> None:
    from services.auth.domain.revocations import RevocationHub, Revocations, Revoked

    got: list[Revoked] = []
    hub = RevocationHub(svc.app.core.db, got.append, poll_seconds=3600)
    await hub.start()
    try:
        hub._last_id = 10**12  # a higher id was already seen: this row commits "late"
        await svc.app.core.db.write(lambda s: Revocations().add(s, credential_ids=["late-one"]))
        await hub.poll_once()
        await hub.poll_once()  # and only once
    finally:
        await hub.stop()
    assert [sorted(b.credential_ids) for b in got] == [["late-one"]]


async def test_an_authenticate_after_a_revocation_never_joins_a_lookup_from_before(
    svc: Auth,
) -> None:
    made = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="raced"), metadata=svc.admin
    )
    core = svc.app.core
    read, entered, release = core.db.read, asyncio.Event(), asyncio.Event()

    async def held_read(fn: Any, *args: Any) -> Any:
        result = await read(fn, *args)
        if fn == core._resolve and not entered.is_set():
            entered.set()  # this lookup read the key valid; it answers after the revoke
            await release.wait()
        return result

    core.db.read = held_read  # type: ignore[method-assign]
    before = asyncio.create_task(authenticate(svc, made.secret))
    await asyncio.wait_for(entered.wait(), 10)
    await svc.keys.RevokeApiKey(
        keys_pb.RevokeApiKeyRequest(key_id=made.api_key.key_id), metadata=svc.admin
    )
    # Asked after the revocation completed: refused, even with the old lookup pending
    # (joining it would wait for it, and then be let in).
    await expect(asyncio.wait_for(authenticate(svc, made.secret), 10), UNAUTH)
    release.set()
    assert (await before).credential_id == made.api_key.key_id  # asked before: as then
    await expect(authenticate(svc, made.secret), UNAUTH)  # and not cached
