"""Usage recording (idempotent), sums and quotas; the audit log; and a scan
proving no secret reaches the database, the logs or an error."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy import String, cast, select
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb
from tokenyard.auth.v1 import user_service_pb2 as users_pb

from services.auth.db.models import Base
from tests.integration.auth.conftest import ADMIN_PASSWORD, PEPPER, Auth
from tests.integration.auth.helpers import expect, make_user, md


def ts(when: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


def record(rid: str, cred: str, user: str, model: str, p: int, c: int, when: datetime) -> Any:
    return usage_pb.UsageRecord(
        request_id=rid,
        credential_id=cred,
        user_id=user,
        model=model,
        prompt_tokens=p,
        completion_tokens=c,
        start_time=ts(when),
        end_time=ts(when),
        status="OK",
    )


async def test_record_usage_is_idempotent_and_feeds_quota(svc: Auth) -> None:
    user_id, key = await make_user(
        svc,
        "quota",
        ["generate"],
        limits=resources_pb2.Limits(token_quota=1000, quota_period=resources_pb2.QUOTA_PERIOD_DAY),
    )
    principal = (await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=key))).principal
    assert principal.quota_used_tokens == 0
    now = datetime.now(UTC)
    batch = [
        record("r1", principal.credential_id, user_id, "smol", 10, 20, now),
        record("r2", principal.credential_id, user_id, "smol", 5, 5, now),
        record("r3", principal.credential_id, user_id, "other", 1, 2, now - timedelta(days=2)),
    ]
    first = await svc.usage.RecordUsage(usage_pb.RecordUsageRequest(records=batch))
    assert (first.accepted, first.duplicates) == (3, 0)
    retry = await svc.usage.RecordUsage(usage_pb.RecordUsageRequest(records=batch))
    assert (retry.accepted, retry.duplicates) == (0, 3)
    again = (await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=key))).principal
    assert again.quota_used_tokens == 40  # today only: r1 + r2
    assert again.limits.token_quota == 1000

    mine = await svc.usage.GetUsage(usage_pb.GetUsageRequest(), metadata=md(key))
    assert (mine.total_requests, mine.total_prompt_tokens, mine.total_completion_tokens) == (
        3,
        16,
        27,
    )
    assert [r.day for r in mine.rows] == sorted(r.day for r in mine.rows)
    smol = await svc.usage.GetUsage(usage_pb.GetUsageRequest(model="smol"), metadata=md(key))
    assert smol.total_requests == 2 and len(smol.rows) == 1
    recent = await svc.usage.GetUsage(
        usage_pb.GetUsageRequest(start_time=ts(now - timedelta(hours=1))), metadata=md(key)
    )
    assert recent.total_requests == 2
    everyone = await svc.usage.GetUsage(usage_pb.GetUsageRequest(), metadata=svc.admin)
    assert everyone.total_requests == 3
    await expect(
        svc.usage.GetUsage(usage_pb.GetUsageRequest(user_id="someone-else"), metadata=md(key)),
        grpc.StatusCode.PERMISSION_DENIED,
        "usage.read",
    )


async def test_concurrent_retries_of_one_batch_count_once(svc: Auth) -> None:
    now = datetime.now(UTC)
    batch = [record(f"c{i}", "cred", "user", "m", 1, 1, now) for i in range(50)]
    request = usage_pb.RecordUsageRequest(records=batch)
    replies = await asyncio.gather(*(svc.usage.RecordUsage(request) for _ in range(4)))
    assert sum(r.accepted for r in replies) == 50
    assert sum(r.duplicates for r in replies) == 150
    total = await svc.usage.GetUsage(usage_pb.GetUsageRequest(), metadata=svc.admin)
    assert (total.total_requests, total.total_prompt_tokens) == (50, 50)


async def test_audit_log_pages_newest_first_and_filters(svc: Auth) -> None:
    for i in range(5):
        await svc.keys.CreateApiKey(keys_pb.CreateApiKeyRequest(name=f"k{i}"), metadata=svc.admin)
    ids: list[int] = []
    token = ""
    while True:
        page = await svc.audit.ListAuditEvents(
            audit_pb.ListAuditEventsRequest(action="key.create", page_size=2, page_token=token),
            metadata=svc.admin,
        )
        ids += [int(e.event_id) for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert len(ids) == 6 and ids == sorted(ids, reverse=True)  # 5 + the bootstrap key
    names: list[str] = []
    token = ""
    while True:
        keys = await svc.keys.ListApiKeys(
            keys_pb.ListApiKeysRequest(page_size=4, page_token=token), metadata=svc.admin
        )
        names += [k.name for k in keys.api_keys]
        token = keys.next_page_token
        if not token:
            break
    assert names == ["k4", "k3", "k2", "k1", "k0", "bootstrap"]
    first = await svc.audit.ListAuditEvents(
        audit_pb.ListAuditEventsRequest(action="key.create", page_size=2), metadata=svc.admin
    )
    await expect(
        svc.audit.ListAuditEvents(
            audit_pb.ListAuditEventsRequest(action="user.create", page_token=first.next_page_token),
            metadata=svc.admin,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )
    later = await svc.audit.ListAuditEvents(
        audit_pb.ListAuditEventsRequest(start_time=ts(datetime.now(UTC) + timedelta(minutes=1))),
        metadata=svc.admin,
    )
    assert list(later.events) == []
    event = first.events[0]
    assert event.actor_user_id and event.actor_credential_id and event.object_type == "api_key"
    assert event.peer.startswith(("ipv4:", "ipv6:"))


async def test_audit_rows_cannot_be_changed(svc: Auth) -> None:
    from sqlalchemy import delete, update

    from services.auth.db.models import AuditRow

    with pytest.raises(Exception, match="append-only"):
        await svc.app.core.db.write(lambda s: s.execute(update(AuditRow).values(action="x")))
    with pytest.raises(Exception, match="append-only"):
        await svc.app.core.db.write(lambda s: s.execute(delete(AuditRow)))


async def test_no_secret_reaches_the_database_logs_or_errors(
    svc: Auth, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [svc.admin_key, ADMIN_PASSWORD, PEPPER]
    user_id, key = await make_user(
        svc, "sec", ["generate", "keys.manage_own"], password="sec-password-9"
    )
    secrets += [key, "sec-password-9"]
    login = await svc.auth.Login(auth_pb.LoginRequest(username="sec", password="sec-password-9"))
    secrets.append(login.session_token)
    await expect(
        svc.auth.Login(auth_pb.LoginRequest(username="sec", password="wrong-password-7")),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    secrets.append("wrong-password-7")
    made = await svc.keys.CreateApiKey(keys_pb.CreateApiKeyRequest(name="s"), metadata=md(key))
    rotated = await svc.keys.RotateApiKey(
        keys_pb.RotateApiKeyRequest(key_id=made.api_key.key_id), metadata=md(key)
    )
    secrets += [made.secret, rotated.secret]
    await svc.users.UpdateUser(
        users_pb.UpdateUserRequest(
            user=resources_pb2.User(user_id=user_id),
            update_mask={"paths": ["password"]},
            password="sec-password-new",
        ),
        metadata=svc.admin,
    )
    secrets.append("sec-password-new")
    errors = []
    for bad in (key + "x", made.secret[:-1] + ("1" if made.secret.endswith("0") else "0")):
        exc = await expect(
            svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=bad)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        errors.append(f"{exc.details()} {exc.trailing_metadata()}")
    await svc.app.core.last_used.flush()

    dump = await svc.app.core.db.read(_dump_all_tables)
    digests = [svc.app.core.digest(s) for s in secrets if s.startswith("ty_")]
    for secret in secrets:
        assert secret not in dump
        assert secret not in caplog.text
        assert all(secret not in e for e in errors)
    audit_dump = await svc.app.core.db.read(lambda s: _dump_table(s, "audit_events"))
    assert not any(d in audit_dump for d in digests)
    assert not any(d in caplog.text for d in digests)


def _dump_table(session: Any, name: str) -> str:
    table = Base.metadata.tables[name]
    rows = session.execute(select(*[cast(c, String) for c in table.columns]))
    return "\n".join(" ".join(str(v) for v in row) for row in rows)


def _dump_all_tables(session: Any) -> str:
    return "\n".join(_dump_table(session, name) for name in Base.metadata.tables)
