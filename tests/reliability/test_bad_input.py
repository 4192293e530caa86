"""Random and hostile input to every RPC of every running service.

Each RPC gets hypothesis-built requests (random fields, invalid UTF-8 in a string
field, NUL, 1 MB strings, edge numbers, NaN, infinity, unknown enum values) and
random metadata, with no credential, a garbage one, the admin's key or the
service token. The only statuses allowed are OK and the client-error ones; the
service answers health afterwards. Then SQL-injection shapes in every string
field of every auth RPC. TOKENYARD_RELIABILITY_FUZZ_EXAMPLES sets examples per
RPC (default 12).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenyard.auth.v1 import (
    api_key_service_pb2,
    audit_service_pb2,
    auth_service_pb2,
    role_service_pb2,
    usage_service_pb2,
    user_service_pb2,
)
from tokenyard.auth.v1 import auth_service_pb2_grpc as auth_grpc
from tokenyard.generation.v1 import generation_service_pb2
from tokenyard.inference.v1 import worker_service_pb2

from tests.integration.router.conftest import bearer
from tests.reliability.conftest import ADMIN_PASSWORD, SERVICE_MD, Proc, Stack, stack_for
from tests.reliability.fuzz import (
    INVALID_UTF8,
    SQL_INJECTION,
    fields_of,
    fill,
    random_metadata,
    string_paths,
    wire_string,
)

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
AUTH_SERVICES = [
    m.DESCRIPTOR.services_by_name[name]
    for m, name in [
        (auth_service_pb2, "AuthService"),
        (user_service_pb2, "UserService"),
        (role_service_pb2, "RoleService"),
        (api_key_service_pb2, "ApiKeyService"),
        (usage_service_pb2, "UsageService"),
        (audit_service_pb2, "AuditService"),
    ]
]
GENERATION = generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"]
WORKER = worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
TARGETS = {
    "auth": [*AUTH_SERVICES, HEALTH],
    "router": [GENERATION, HEALTH],
    # Drain is last, on its own: a drained worker refuses work on purpose.
    "worker": [GENERATION, WORKER, HEALTH],
}
CASES = [
    pytest.param(target, m, id=f"{target}-{m.containing_service.name}.{m.name}")
    for target, services in TARGETS.items()
    for service in services
    for m in service.methods
    if m.name != "Drain"
]
EXAMPLES = int(os.environ.get("TOKENYARD_RELIABILITY_FUZZ_EXAMPLES", "12"))
STATUSES: Counter[str] = Counter()


@dataclass
class Services:
    """The running stack under fuzz and the credentials a call may carry."""

    stack: Stack
    procs: dict[str, Proc]
    admin: str = field(repr=False)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """Auth (SQLite), a worker behind a router, and a worker fuzzed directly."""
    with stack_for(tmp_path_factory.mktemp("bad-input")) as stack:
        pending = [stack.engine_worker(delay=0.0, wait=False) for _ in range(2)]
        url = f"sqlite:///{stack.tmp / 'auth.db'}"
        admin = stack.bootstrap(url)
        auth = stack.auth_url(url)
        routed, direct = (stack.wait_serving(w) for w in pending)
        router = stack.start_router(auth, [routed])
        yield Services(stack, {"auth": auth, "router": router, "worker": direct}, admin)


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def call(
    channel: grpc.Channel, method: MethodDescriptor, data: bytes, md: Sequence[tuple[str, object]]
) -> grpc.StatusCode:
    """Send raw `data` to `method`; the status (a stream is read to its first message:
    watch streams send one at once, then only on change)."""
    path = path_of(method)
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path)(data, metadata=list(md), timeout=60)
            try:
                next(stream, None)
            finally:
                stream.cancel()
        else:
            channel.unary_unary(path)(data, metadata=list(md), timeout=60)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def credentials(admin: str) -> st.SearchStrategy[list[tuple[str, object]]]:
    """No credential, a garbage one, the admin's key, or the service token."""
    return st.sampled_from(
        [
            [],
            [("authorization", "Bearer ty_sk_garbage")],
            [("authorization", "Basic x")],
            list(bearer(admin)),
            list(SERVICE_MD),
            [*bearer(admin), *SERVICE_MD],
        ]
    )


def healthy(proc: Proc) -> int:
    with grpc.insecure_channel(proc.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return int(reply.status)


# Examples holding 1 MB strings make hypothesis warn that their repr is large.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
@pytest.mark.parametrize(("target", "method"), CASES)
def test_random_input_gets_a_client_status_never_internal(
    services: Services, target: str, method: MethodDescriptor, report: dict[str, object]
) -> None:
    request_class = GetMessageClass(method.input_type)
    utf8_paths = string_paths(method.input_type)
    seen: list[str] = []
    with grpc.insecure_channel(services.procs[target].address) as channel:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            values=fields_of(method.input_type),
            broken=st.one_of(
                st.none(),
                st.tuples(st.sampled_from(utf8_paths or [(1,)]), st.sampled_from(INVALID_UTF8)),
            ),
            md=random_metadata,
            cred=credentials(services.admin),
        )
        def check(
            values: dict[str, object],
            broken: tuple[tuple[int, ...], bytes] | None,
            md: list[tuple[str, object]],
            cred: list[tuple[str, object]],
        ) -> None:
            message: Message = fill(request_class(), values)
            data = message.SerializeToString()
            if broken is not None and utf8_paths:
                data += wire_string(*broken)
            code = call(channel, method, data, md + cred)
            seen.append(code.name)
            assert code in ALLOWED, f"{path_of(method)} answered {code.name}"

        check()
    STATUSES.update(seen)
    report["bad input: statuses over every RPC"] = dict(STATUSES)
    assert healthy(services.procs[target]) == health_pb2.HealthCheckResponse.SERVING


def test_drain_with_bad_input_then_health(services: Services) -> None:
    drain = WORKER.methods_by_name["Drain"]
    worker = services.procs["worker"]
    with grpc.insecure_channel(worker.address) as channel:
        for md in ([], [("x-tokenyard-service-token", "wrong")], [("authorization", "x")]):
            assert call(channel, drain, b"\xff\xff", md) in ALLOWED
        assert call(channel, drain, wire_string((1,), b"\xff"), list(SERVICE_MD)) in ALLOWED
        assert call(channel, drain, b"", list(SERVICE_MD)) == grpc.StatusCode.OK
    # Drained on purpose: it still answers health, with NOT_SERVING once idle.
    assert healthy(worker) in (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )


def test_sql_injection_in_every_auth_string_field(
    services: Services, report: dict[str, object]
) -> None:
    auth = services.procs["auth"]
    sent: Counter[str] = Counter()
    with grpc.insecure_channel(auth.address) as channel:
        for service in AUTH_SERVICES:
            for method in service.methods:
                for path in string_paths(method.input_type):
                    for payload in SQL_INJECTION:
                        data = _with_string(method, path, payload)
                        for cred in ([], list(bearer(services.admin))):
                            code = call(channel, method, data, cred)
                            sent[code.name] += 1
                            assert code in ALLOWED, (path_of(method), path, code.name)
        stub = auth_grpc.AuthServiceStub(channel)
        for name in ("admin' --", "admin' OR '1'='1", "' OR 1=1 --"):
            with pytest.raises(grpc.RpcError) as exc:
                stub.Login(auth_service_pb2.LoginRequest(username=name, password="x' OR '1'='1"))
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The database is intact: the admin still logs in and lists users.
        assert stub.Login(auth_service_pb2.LoginRequest(username="admin", password=ADMIN_PASSWORD))
        users = user_service_pb2.ListUsersRequest()
        channel.unary_unary("/tokenyard.auth.v1.UserService/ListUsers")(
            users.SerializeToString(), metadata=bearer(services.admin)
        )
    report["bad input: SQL injection in auth fields"] = dict(sent, requests=sum(sent.values()))
    assert healthy(auth) == health_pb2.HealthCheckResponse.SERVING


def _with_string(method: MethodDescriptor, path: tuple[int, ...], value: str) -> bytes:
    """A request with only the string at `path` set to `value`."""
    return wire_string(path, value.encode())
