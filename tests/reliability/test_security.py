"""Security behaviour of the running stack: no timing oracle, lockout, revocation.

Every process's log is scanned for the secrets the test made when its stack
stops (see conftest.Stack.leaks): keys, their digests, passwords (wrong ones
too), the pepper and the service token.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import api_key_service_pb2_grpc as keys_grpc
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import audit_service_pb2_grpc as audit_grpc
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import auth_service_pb2_grpc as auth_grpc
from tokenyard.auth.v1 import user_service_pb2 as users_pb
from tokenyard.auth.v1 import user_service_pb2_grpc as users_grpc
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from services.auth.domain import credentials
from tests.integration.router.conftest import PEPPER, bearer
from tests.reliability.conftest import SERVICE_MD, Proc, Stack, digest
from tests.reliability.streams import run_stream

TRIES = 40
# Medians may differ by noise on a shared machine, never by a skipped hash or lookup.
FACTOR = 4.0
OWASP_ARGON2: dict[str, Any] = {
    "TOKENYARD_AUTH_ARGON2_TIME_COST": "2",
    "TOKENYARD_AUTH_ARGON2_MEMORY_KIB": "19456",
    "TOKENYARD_AUTH_ARGON2_PARALLELISM": "1",
}


def create_user(auth: Proc, admin: str, username: str, password: str) -> str:
    """A user without roles; returns its id."""
    with grpc.insecure_channel(auth.address) as channel:
        reply = users_grpc.UserServiceStub(channel).CreateUser(
            users_pb.CreateUserRequest(username=username, password=password), metadata=bearer(admin)
        )
    return str(reply.user.user_id)


def wrong_secret(key: str) -> str:
    """`key` with one secret character changed and a valid checksum: well-formed, unknown."""
    body = key[: -credentials.CHECKSUM_CHARS]
    last = body[-1]
    body = body[:-1] + ("A" if last != "A" else "B")
    return body + credentials.checksum(body)


def medians(a: Callable[[], object], b: Callable[[], object]) -> tuple[float, float]:
    """Median seconds of `a` and of `b`, interleaved so drift hits both alike."""
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(TRIES):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def refused(call: Callable[[], object]) -> Callable[[], object]:
    """`call`, which must fail with UNAUTHENTICATED."""

    def run() -> None:
        try:
            call()
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            return
        raise AssertionError("accepted")

    return run


def test_unknown_and_wrong_credentials_take_the_same_time(
    stack: Stack, report: dict[str, object]
) -> None:
    url = f"sqlite:///{stack.tmp / 'auth.db'}"
    admin = stack.bootstrap(url)
    auth = stack.auth_url(
        url,
        TOKENYARD_AUTH_LOCKOUT_THRESHOLD="100000",
        TOKENYARD_LOG_LEVEL="warning",
        **OWASP_ARGON2,
    )
    user = stack.user(auth, admin)
    create_user(auth, admin, "timing-user", "timing-password-1")
    unknown_key = credentials.generate(credentials.USER_KEY_PREFIX)
    near_key = wrong_secret(user.key)
    stack.secrets.update({unknown_key, near_key, "timing-password-1", "wrong-password-1"})
    with grpc.insecure_channel(auth.address) as channel:
        stub = auth_grpc.AuthServiceStub(channel)

        def authenticate(key: str) -> Callable[[], object]:
            request = auth_pb.AuthenticateRequest(credential=key)
            return refused(lambda: stub.Authenticate(request, metadata=SERVICE_MD))

        def login(username: str) -> Callable[[], object]:
            request = auth_pb.LoginRequest(username=username, password="wrong-password-1")
            return refused(lambda: stub.Login(request))

        key_unknown, key_wrong = medians(authenticate(unknown_key), authenticate(near_key))
        user_unknown, user_wrong = medians(login("nobody-here"), login("timing-user"))
    report["timing medians (ms)"] = {
        "Authenticate unknown key": round(key_unknown * 1000, 3),
        "Authenticate known key, wrong secret": round(key_wrong * 1000, 3),
        "Login unknown user": round(user_unknown * 1000, 3),
        "Login wrong password": round(user_wrong * 1000, 3),
        "tries each": TRIES,
    }
    assert max(key_unknown, key_wrong) < FACTOR * min(key_unknown, key_wrong)
    assert max(user_unknown, user_wrong) < FACTOR * min(user_unknown, user_wrong)


def test_brute_force_login_locks_the_account_and_is_audited(
    stack: Stack, report: dict[str, object]
) -> None:
    url = f"sqlite:///{stack.tmp / 'auth.db'}"
    admin = stack.bootstrap(url)
    auth = stack.auth_url(
        url,
        TOKENYARD_AUTH_LOCKOUT_THRESHOLD="3",
        TOKENYARD_AUTH_LOCKOUT_SECONDS="1",
        TOKENYARD_LOG_LEVEL="debug",
    )
    password, guesses = "victim-password-1", [f"guess-{i}-secret" for i in range(3)]
    stack.secrets.update({password, *guesses})
    victim = create_user(auth, admin, "victim", password)
    with grpc.insecure_channel(auth.address) as channel:
        stub = auth_grpc.AuthServiceStub(channel)
        for guess in guesses:
            attempt = auth_pb.LoginRequest(username="victim", password=guess)
            refused(functools.partial(stub.Login, attempt))()
        # Locked: even the right password is refused, with the same error.
        refused(lambda: stub.Login(auth_pb.LoginRequest(username="victim", password=password)))()
        audit = audit_grpc.AuditServiceStub(channel)

        def events(action: str) -> list[audit_pb.AuditEvent]:
            reply = audit.ListAuditEvents(
                audit_pb.ListAuditEventsRequest(action=action, page_size=100),
                metadata=bearer(admin),
            )
            return [e for e in reply.events if victim in (e.object_id, e.actor_user_id)]

        failures, lockouts = events("login.failure"), events("login.lockout")
        time.sleep(1.2)  # the configured lockout ends
        assert stub.Login(auth_pb.LoginRequest(username="victim", password=password)).session_token
    report["brute-force login (threshold 3)"] = dict(
        failure_rows=len(failures), lockout_rows=len(lockouts)
    )
    assert len(failures) >= 4  # three guesses and the attempt while locked
    assert len(lockouts) == 1
    rows = str(failures + lockouts)
    assert not any(secret in rows for secret in (password, *guesses))


async def test_a_revoked_key_is_refused_by_a_second_router_within_the_bound(
    stack: Stack, report: dict[str, object]
) -> None:
    url = f"sqlite:///{stack.tmp / 'auth.db'}"
    admin = stack.bootstrap(url)
    # Auth lets routers cache a principal for 60 s: only the pushed revocation is faster.
    auth = stack.auth_url(url, TOKENYARD_AUTH_CACHE_TTL="60")
    user = stack.user(auth, admin)
    worker = stack.engine_worker(delay=0.0)
    first, second = stack.start_router(auth, [worker]), stack.start_router(auth, [worker])
    async with (
        grpc.aio.insecure_channel(first.address) as one,
        grpc.aio.insecure_channel(second.address) as two,
        grpc.aio.insecure_channel(auth.address) as auth_channel,
    ):
        stubs = [gen_grpc.GenerationServiceStub(one), gen_grpc.GenerationServiceStub(two)]
        for stub in stubs:  # both routers cache the key
            assert (await run_stream(stub, "cache me", 2, user.key)).exact
        await keys_grpc.ApiKeyServiceStub(auth_channel).RevokeApiKey(
            keys_pb.RevokeApiKeyRequest(key_id=user.key_id), metadata=bearer(admin)
        )
        revoked_at = time.monotonic()
        latency: list[float] = []
        for stub in stubs:
            status = "OK"
            while status == "OK" and time.monotonic() - revoked_at < 15:
                status = (await run_stream(stub, "still?", 1, user.key)).status
            latency.append(time.monotonic() - revoked_at)
            assert status == "UNAUTHENTICATED"
    report["revocation reaches both routers (s)"] = [round(s, 2) for s in latency]
    # Within 15 s of the revoke although auth granted a 60 s cache: the push worked.


def test_the_log_scan_finds_a_key_its_digest_and_the_pepper(stack: Stack) -> None:
    key = credentials.generate(credentials.USER_KEY_PREFIX)
    stack.secrets.add(key)
    log = stack.tmp / "planted.log"
    log.write_text(f"a line with {key}\n")
    assert stack.leaks() == [f"planted.log: secret {key[:6]}…"]
    log.write_text(f"digest={digest(key)} pepper={PEPPER}\n")
    assert sorted(stack.leaks()) == ["planted.log: digest of ty_sk_…", "planted.log: pepper"]
    log.unlink()  # the stack's own end-of-test scan must pass
