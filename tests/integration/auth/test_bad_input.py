"""Bad input and bad credentials: the right status, a message naming the
problem, never INTERNAL, and the service keeps serving."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2
from tokenyard.auth.v1 import role_service_pb2 as roles_pb
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb
from tokenyard.auth.v1 import user_service_pb2 as users_pb

from services.auth.domain import credentials, pages
from tests.integration.auth.conftest import Auth
from tests.integration.auth.helpers import expect, field_of

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTH = grpc.StatusCode.UNAUTHENTICATED

Case = tuple[str, Callable[[Auth], Awaitable[Any]], grpc.StatusCode, str]


def _user(**kw: Any) -> Callable[[Auth], Awaitable[Any]]:
    kw.setdefault("password", "password-123")
    return lambda s: s.users.CreateUser(users_pb.CreateUserRequest(**kw), metadata=s.admin)


def _role(**kw: Any) -> Callable[[Auth], Awaitable[Any]]:
    return lambda s: s.roles.CreateRole(
        roles_pb.CreateRoleRequest(role=resources_pb2.Role(**kw)), metadata=s.admin
    )


def _forged_token() -> str:
    raw = json.dumps({"p": ["zzz"], "f": "0000"}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _nul_token() -> str:
    """A token with the right filter fingerprint but a NUL in its position."""
    good = pages.encode(["x"], "users")
    data = json.loads(base64.urlsafe_b64decode(good + "=" * (-len(good) % 4)))
    data["p"] = ["a\x00b"]
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


CASES: list[Case] = [
    ("empty username", _user(username=""), INVALID, "username"),
    ("long username", _user(username="a" * 65), INVALID, "username"),
    ("bad chars", _user(username="Bob Smith"), INVALID, "username"),
    ("unknown role", _user(username="bob", roles=["ghost"]), INVALID, "roles"),
    ("short password", _user(username="bob", password="short"), INVALID, "password"),
    ("huge password", _user(username="bob", password="x" * 1025), INVALID, "password"),
    ("long display", _user(username="bob", display_name="d" * 201), INVALID, "display_name"),
    ("dup username", _user(username="admin"), grpc.StatusCode.ALREADY_EXISTS, "admin"),
    ("empty role name", _role(name=""), INVALID, "role.name"),
    ("bad role name", _role(name="-x"), INVALID, "role.name"),
    ("unknown perm", _role(name="rr", permissions=["fly"]), INVALID, "role.permissions"),
    ("bad pattern", _role(name="rr", allowed_models=["a*b"]), INVALID, "role.allowed_models"),
    ("dup role", _role(name="admin"), grpc.StatusCode.ALREADY_EXISTS, "admin"),
    (
        "page size",
        lambda s: s.users.ListUsers(users_pb.ListUsersRequest(page_size=1001), metadata=s.admin),
        INVALID,
        "page_size",
    ),
    (
        "negative page size",
        lambda s: s.roles.ListRoles(roles_pb.ListRolesRequest(page_size=-1), metadata=s.admin),
        INVALID,
        "page_size",
    ),
    (
        "garbage page token",
        lambda s: s.users.ListUsers(
            users_pb.ListUsersRequest(page_token="%%%not-base64"), metadata=s.admin
        ),
        INVALID,
        "page_token",
    ),
    (
        "forged page token",
        lambda s: s.audit.ListAuditEvents(
            audit_pb.ListAuditEventsRequest(page_token=_forged_token()), metadata=s.admin
        ),
        INVALID,
        "page_token",
    ),
    (
        "NUL in page token",
        lambda s: s.users.ListUsers(
            users_pb.ListUsersRequest(page_token=_nul_token()), metadata=s.admin
        ),
        INVALID,
        "page_token",
    ),
    (
        "huge grace period",
        lambda s: s.keys.RotateApiKey(
            keys_pb.RotateApiKeyRequest(
                key_id="00000000-0000-0000-0000-000000000000",
                grace_period=duration_pb2.Duration(seconds=315_576_000_000),
            ),
            metadata=s.admin,
        ),
        INVALID,
        "grace_period",
    ),
    (
        "NUL in login name",
        lambda s: s.auth.Login(auth_pb.LoginRequest(username="ad\x00min", password="whatever1")),
        UNAUTH,
        "invalid username or password",
    ),
    (
        "NUL in usage filter",
        lambda s: s.usage.GetUsage(usage_pb.GetUsageRequest(model="m\x00"), metadata=s.admin),
        INVALID,
        "model",
    ),
    (
        "far-future timestamp",
        lambda s: s.audit.ListAuditEvents(
            audit_pb.ListAuditEventsRequest(
                start_time=timestamp_pb2.Timestamp(seconds=253_402_300_800)
            ),
            metadata=s.admin,
        ),
        INVALID,
        "start_time",
    ),
    (
        "bad user id",
        lambda s: s.users.GetUser(users_pb.GetUserRequest(user_id="nope"), metadata=s.admin),
        INVALID,
        "user_id",
    ),
    (
        "empty key name",
        lambda s: s.keys.CreateApiKey(keys_pb.CreateApiKeyRequest(name=""), metadata=s.admin),
        INVALID,
        "name",
    ),
    (
        "long key name",
        lambda s: s.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(name="n" * 101), metadata=s.admin
        ),
        INVALID,
        "name",
    ),
    (
        "unknown key perm",
        lambda s: s.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(name="k", permissions=["root"]), metadata=s.admin
        ),
        INVALID,
        "permissions",
    ),
    (
        "empty mask",
        lambda s: s.users.UpdateUser(
            users_pb.UpdateUserRequest(
                user=resources_pb2.User(
                    user_id=s.app.core.settings.key_pepper
                    and "00000000-0000-0000-0000-000000000000"
                )
            ),
            metadata=s.admin,
        ),
        INVALID,
        "update_mask",
    ),
    (
        "too many usage records",
        lambda s: s.usage.RecordUsage(
            usage_pb.RecordUsageRequest(
                records=[
                    usage_pb.UsageRecord(
                        request_id=str(i), credential_id="c", user_id="u", model="m"
                    )
                    for i in range(1001)
                ]
            )
        ),
        INVALID,
        "records",
    ),
    (
        "usage record without id",
        lambda s: s.usage.RecordUsage(
            usage_pb.RecordUsageRequest(
                records=[usage_pb.UsageRecord(credential_id="c", user_id="u", model="m")]
            )
        ),
        INVALID,
        "records[0].request_id",
    ),
    (
        "empty login",
        lambda s: s.auth.Login(auth_pb.LoginRequest(username="", password="x")),
        INVALID,
        "username",
    ),
    (
        "huge login password",
        lambda s: s.auth.Login(auth_pb.LoginRequest(username="admin", password="p" * 2000)),
        INVALID,
        "password",
    ),
]


async def test_bad_requests_get_the_right_status(svc: Auth) -> None:
    for name, call, code, word in CASES:
        try:
            exc = await expect(call(svc), code, word)
        except AssertionError as failure:
            raise AssertionError(f"case {name!r}: {failure}") from None
        if code == INVALID:
            assert word.split("[")[0] in field_of(exc), (name, field_of(exc))
    who = await svc.auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=svc.admin)
    assert who.principal.username == "admin"  # still serving


async def test_bad_credentials_are_refused_before_any_lookup(svc: Auth) -> None:
    good = svc.admin_key
    body = good[:-6]
    wrong_check = body + ("000000" if not good.endswith("000000") else "111111")
    digest = await svc.app.core.db.read(_first_digest)
    bad = [
        "",
        "not-a-key",
        "ty_xx_" + good[6:],  # unknown prefix
        "ty_svc_" + good[6:],  # wrong type prefix
        wrong_check,
        digest,  # the stored digest presented as a key
        credentials.generate(credentials.USER_KEY_PREFIX),  # well-formed but unknown
        good + "a",
        "x" * 5000,
    ]
    messages = set()
    for credential in bad:
        exc = await expect(
            svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=credential)), UNAUTH
        )
        messages.add(exc.details())
    assert messages == {"invalid or missing credential"}


async def test_malformed_authorization_metadata(svc: Auth) -> None:
    who = auth_pb.WhoAmIRequest()
    await expect(svc.auth.WhoAmI(who), UNAUTH, "authorization")
    await expect(
        svc.auth.WhoAmI(who, metadata=(("authorization", f"bearer {svc.admin_key}"),)),
        UNAUTH,
        "Bearer",
    )
    await expect(
        svc.auth.WhoAmI(
            who,
            metadata=(
                ("authorization", f"Bearer {svc.admin_key}"),
                ("authorization", f"Bearer {svc.admin_key}"),
            ),
        ),
        UNAUTH,
        "exactly one",
    )
    exc = await expect(
        svc.auth.WhoAmI(who, metadata=(*svc.admin, ("x-padding", "p" * 10_000))), INVALID
    )
    assert "metadata" in (exc.details() or "")
    await expect(
        svc.auth.WhoAmI(who, metadata=(("authorization", "Bearer " + "k" * 10_000),)), INVALID
    )
    assert (await svc.auth.WhoAmI(who, metadata=svc.admin)).principal.username == "admin"


def _first_digest(session: Any) -> str:
    from sqlalchemy import select

    from services.auth.db.models import ApiKeyRow

    value = session.scalar(select(ApiKeyRow.digest))
    assert isinstance(value, str)
    return value


async def test_random_garbage_never_causes_internal_errors(svc: Auth) -> None:
    rng = random.Random(1234)
    alphabet = "aZ09._-*/ \x00\x01\n\t\u00e9\u4e2d\U0001f600\ud7ff'\";%"

    def junk() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))

    for _ in range(8):
        calls = [
            svc.users.CreateUser(
                users_pb.CreateUserRequest(
                    username=junk(), password=junk(), display_name=junk(), roles=[junk()]
                ),
                metadata=svc.admin,
            ),
            svc.roles.CreateRole(
                roles_pb.CreateRoleRequest(
                    role=resources_pb2.Role(
                        name=junk(),
                        description=junk(),
                        permissions=[junk()],
                        allowed_models=[junk()],
                    ),
                    request_id=junk(),
                ),
                metadata=svc.admin,
            ),
            svc.keys.CreateApiKey(
                keys_pb.CreateApiKeyRequest(name=junk(), allowed_models=[junk()], user_id=junk()),
                metadata=svc.admin,
            ),
            svc.keys.ListApiKeys(keys_pb.ListApiKeysRequest(page_token=junk()), metadata=svc.admin),
            svc.audit.ListAuditEvents(
                audit_pb.ListAuditEventsRequest(action=junk(), object_id=junk(), page_token=junk()),
                metadata=svc.admin,
            ),
            svc.usage.GetUsage(
                usage_pb.GetUsageRequest(user_id=junk(), model=junk()), metadata=svc.admin
            ),
            svc.auth.Login(auth_pb.LoginRequest(username=junk(), password=junk())),
            svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential="ty_sk_" + junk())),
        ]
        for call in calls:
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                assert exc.code() != grpc.StatusCode.INTERNAL, exc.details()
                assert exc.code() != grpc.StatusCode.UNKNOWN, exc.details()
