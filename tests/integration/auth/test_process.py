"""`tokenyard auth …` as real processes: settings errors, schema check, serve,
internal-token protection, bootstrap and the demo setup."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import auth_service_pb2_grpc as auth_grpc

from services.auth.bootstrap import bootstrap_admin, ensure_demo
from services.auth.domain import credentials
from services.common.errors import FailedPrecondition
from services.common.interceptors import SERVICE_TOKEN_HEADER
from tests.conftest import WAIT_TIMEOUT, free_port
from tests.integration.auth.conftest import PEPPER, make_settings

TOKENYARD = [sys.executable, "-m", "services.cli"]


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("TOKENYARD_")}
    out.update(
        TOKENYARD_AUTH_KEY_PEPPER=PEPPER,
        TOKENYARD_AUTH_DATABASE_URL=f"sqlite:///{tmp_path / 'auth.db'}",
        TOKENYARD_AUTH_ARGON2_TIME_COST="1",
        TOKENYARD_AUTH_ARGON2_MEMORY_KIB="64",
        TOKENYARD_AUTH_ARGON2_PARALLELISM="1",
    )
    out.update(extra)
    return out


def run(args: list[str], environ: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOKENYARD, *args],
        check=False,
        env=environ,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_database_url_stops_serve_with_one_line(tmp_path: Path) -> None:
    done = run(
        ["auth", "serve"], env(tmp_path, TOKENYARD_AUTH_DATABASE_URL="mysql://db/x"), tmp_path
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "TOKENYARD_AUTH_DATABASE_URL" in lines[0]
    assert "Traceback" not in done.stderr


def test_serve_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    done = run(["auth", "serve", "--port", "0"], env(tmp_path), tmp_path)
    assert done.returncode == 1
    assert "tokenyard auth migrate" in done.stderr and "Traceback" not in done.stderr


def test_bootstrap_prints_one_key_and_refuses_a_second_admin(tmp_path: Path) -> None:
    environ = env(tmp_path, TOKENYARD_AUTH_BOOTSTRAP_PASSWORD="first-admin-pw")
    done = run(["auth", "bootstrap"], environ, tmp_path)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip().splitlines()[-1]
    assert key.startswith("ty_sk_")
    settings = make_settings(environ["TOKENYARD_AUTH_DATABASE_URL"])
    with pytest.raises(FailedPrecondition, match="admin exists"):
        asyncio.run(bootstrap_admin(settings, "second", "second-admin-pw"))


async def test_serve_with_migrate_is_healthy_guards_internal_rpcs_and_stops_on_sigterm(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    environ = env(
        tmp_path,
        TOKENYARD_SERVICE_TOKEN="internal-token-123",
        TOKENYARD_AUTH_DATABASE_URL=database_url,
        TOKENYARD_LOG_LEVEL="debug",
    )
    probe_key = credentials.generate(credentials.USER_KEY_PREFIX)
    proc = await asyncio.create_subprocess_exec(
        *TOKENYARD, "auth", "serve", "--migrate", "--port", str(port),
        env=environ, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = asyncio.get_running_loop().time() + WAIT_TIMEOUT
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    pytest.fail("auth did not become healthy")
                await asyncio.sleep(0.1)
            stub = auth_grpc.AuthServiceStub(channel)
            request = auth_pb.AuthenticateRequest(credential=probe_key)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Authenticate(request)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "service credential" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as bad_key:
                await stub.Authenticate(
                    request, metadata=((SERVICE_TOKEN_HEADER, "internal-token-123"),)
                )
            assert bad_key.value.details() == "invalid or missing credential"
            with pytest.raises(grpc.aio.AioRpcError) as login:  # public: no token needed
                await stub.Login(auth_pb.LoginRequest(username="nobody", password="pw-in-logs?"))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.WhoAmI(
                    auth_pb.WhoAmIRequest(), metadata=(("authorization", f"Bearer {probe_key}"),)
                )
            assert login.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    logs = stderr.decode()
    assert proc.returncode == 0, logs[-2000:]
    assert "WhoAmI" in logs  # the access log was written at debug level...
    for secret in (probe_key, "pw-in-logs?", "internal-token-123", PEPPER):
        assert secret not in logs  # ...and holds no secret


def test_ensure_demo_is_idempotent(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(database_url)
    key_file = tmp_path / ".tokenyard" / "demo-key"
    first = ensure_demo(settings, key_file)
    assert key_file.read_text().strip() == first
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert ensure_demo(settings, key_file) == first
    key_file.write_text("ty_sk_garbage\n")
    replaced = ensure_demo(settings, key_file)
    assert replaced != first and key_file.read_text().strip() == replaced
