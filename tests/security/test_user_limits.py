"""Auth tells routers the user's own limits apart from a credential's narrower ones,
so role limits count per user across every key and session (issue 12, item 6)."""

from __future__ import annotations

from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2

from tests.integration.auth.conftest import Auth
from tests.integration.auth.helpers import make_user


async def test_a_key_narrower_than_the_role_keeps_the_users_limits_apart(svc: Auth) -> None:
    """Attack: a second key, or a Login session, to get a fresh set of role limits. Auth
    reports the role's limits as `user_limits` on every credential of the user, so a
    router counts them together; the key's tighter limits stay its own."""
    role = resources_pb2.Limits(requests_per_minute=10, concurrent_streams=4)
    user_id, first = await make_user(svc, "carol", ["generate"], limits=role)
    narrow = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(
            user_id=user_id,
            name="narrow",
            limits=resources_pb2.Limits(requests_per_minute=3),
        ),
        metadata=svc.admin,
    )
    login = await svc.auth.Login(auth_pb.LoginRequest(username="carol", password="user-password-1"))
    principals = {}
    for name, credential in (
        ("first", first),
        ("narrow", narrow.secret),
        ("session", login.session_token),
    ):
        reply = await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=credential))
        principals[name] = reply.principal
    for p in principals.values():
        assert p.user_id == user_id
        assert p.user_limits.requests_per_minute == 10
        assert p.user_limits.concurrent_streams == 4
    assert principals["narrow"].limits.requests_per_minute == 3
    assert principals["first"].limits.requests_per_minute == 10
    assert principals["session"].limits.requests_per_minute == 10
