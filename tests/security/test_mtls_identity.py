"""Mutual TLS checks identity: a certificate from the shared CA is not enough."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import auth_service_pb2_grpc as auth_grpc
from tokenyard.inference.v1 import worker_service_pb2 as worker_pb
from tokenyard.inference.v1 import worker_service_pb2_grpc as worker_grpc

from services.auth.app import AuthApp
from services.auth.bootstrap import bootstrap_admin
from services.auth.settings import AuthSettings
from services.common.config import ServerSettings
from services.common.lenient import lenient
from services.common.server import GrpcServer
from services.inference import worker_service
from services.inference.worker import Worker, WorkerInfo
from services.stack.certs import make_dev_certs
from tests.integration.auth.conftest import ADMIN_PASSWORD, start
from tests.reliability.fake_engine_worker import EOS, VOCAB, ByteTokenizer, FakeEngine


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA and a certificate per service, as `tokenyard up --tls` issues them."""
    return make_dev_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def tls_auth(settings: AuthSettings, certs: Path) -> AsyncIterator[AuthApp]:
    """A real auth server requiring client certificates from the internal CA."""
    server = dataclasses.replace(
        settings.server,
        tls_cert=certs / "auth.pem",
        tls_key=certs / "auth.key",
        tls_client_ca=certs / "ca.pem",
    )
    settings = dataclasses.replace(settings, server=server)
    await bootstrap_admin(settings, "admin", ADMIN_PASSWORD)
    app, plain = await start(settings)
    await plain.close()
    try:
        yield app
    finally:
        await app.stop(0)


async def authenticate_as(app: AuthApp, certs: Path, client: str) -> grpc.StatusCode:
    """Call Authenticate (an internal RPC) presenting `client`'s certificate."""
    creds = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(),
        (certs / f"{client}.key").read_bytes(),
        (certs / f"{client}.pem").read_bytes(),
    )
    async with grpc.aio.secure_channel(f"localhost:{app.port}", creds) as channel:
        try:
            await auth_grpc.AuthServiceStub(channel).Authenticate(
                auth_pb.AuthenticateRequest(credential="ty_sk_not-a-key"), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_workers_certificate_is_refused_by_auth(tls_auth: AuthApp, certs: Path) -> None:
    """Attack: a compromised worker uses its own certificate (signed by the same
    internal CA) to call auth's internal RPCs as if it were the router."""
    assert await authenticate_as(tls_auth, certs, "worker") == grpc.StatusCode.PERMISSION_DENIED
    # The router's certificate gets through to the credential check itself.
    assert await authenticate_as(tls_auth, certs, "router") == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
async def tls_worker(certs: Path) -> AsyncIterator[int]:
    """The real worker servicers (over the reliability suite's FakeEngine) served by
    GrpcServer with mutual TLS, as `tokenyard inference serve` does; yields the port."""
    engine = FakeEngine(max_running=4, max_queued=4, token_delay=0.0, context_length=256)
    info = WorkerInfo(
        model="fake-model",
        context_length=256,
        vocab_size=VOCAB,
        max_running=4,
        max_queued=4,
        device="fake",
        dtype="none",
        prefix_cache=False,
        version="0.0.0-fake",
    )
    settings = ServerSettings(
        port=0,
        grace_period=0.0,
        tls_cert=certs / "worker.pem",
        tls_key=certs / "worker.key",
        tls_client_ca=certs / "ca.pem",
    )
    server = GrpcServer(settings)
    worker = Worker(engine, ByteTokenizer(), info, eos_token_ids=frozenset({EOS}))  # type: ignore[arg-type]
    server.add(
        lenient(worker_grpc.add_WorkerServiceServicer_to_server),
        worker_service.WorkerServicer(worker),
        worker_service.SERVICE_NAME,
    )
    port = await server.start()
    try:
        yield port
    finally:
        engine.closed = True
        await server.stop(0)
        await worker.close()


async def describe_as(port: int, certs: Path, client: str) -> grpc.StatusCode:
    """Call the worker's Describe presenting `client`'s certificate."""
    creds = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(),
        (certs / f"{client}.key").read_bytes(),
        (certs / f"{client}.pem").read_bytes(),
    )
    async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
        try:
            await worker_grpc.WorkerServiceStub(channel).Describe(
                worker_pb.DescribeRequest(), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_an_auth_certificate_is_refused_by_a_worker(tls_worker: int, certs: Path) -> None:
    """Attack: a compromised auth replica uses its certificate to drive workers directly
    (generate without limits or billing, or Drain them)."""
    assert await describe_as(tls_worker, certs, "auth") == grpc.StatusCode.PERMISSION_DENIED
    assert await describe_as(tls_worker, certs, "router") == grpc.StatusCode.OK
