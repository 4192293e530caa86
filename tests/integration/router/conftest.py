"""Router integration fixtures: real processes on loopback.

The real auth (`tokenyard auth serve` on a SQLite file, admin made by
`tokenyard auth bootstrap`), test-double workers
(`python -m tests.doubles.fake_worker`) or real ones
(`tokenyard inference serve`), and routers (`tokenyard router serve`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import api_key_service_pb2_grpc as keys_grpc
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.auth.v1 import role_service_pb2 as roles_pb
from tokenyard.auth.v1 import role_service_pb2_grpc as roles_grpc
from tokenyard.auth.v1 import user_service_pb2 as users_pb
from tokenyard.auth.v1 import user_service_pb2_grpc as users_grpc

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[3]
PYTHON = sys.executable
TOKENYARD = str(Path(PYTHON).with_name("tokenyard"))
SERVICE_TOKEN = "router-integration-service-token"
PEPPER = "pepper-for-router-integration-tests"


def base_env(**extra: str) -> dict[str, str]:
    """The environment every process gets: quiet logs, cheap argon2, shared token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENYARD_", "OTEL_"))}
    env.update(
        TOKENYARD_LOG_LEVEL="warning",
        TOKENYARD_SERVICE_TOKEN=SERVICE_TOKEN,
        TOKENYARD_AUTH_KEY_PEPPER=PEPPER,
        TOKENYARD_AUTH_ARGON2_TIME_COST="1",
        TOKENYARD_AUTH_ARGON2_MEMORY_KIB="64",
        TOKENYARD_AUTH_ARGON2_PARALLELISM="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Launcher:
    """Starts processes, waits for their health, stops them all at the end."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], port: int, env: dict[str, str]) -> Proc:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    def wait_serving(self, proc: Proc, timeout: float = 60.0) -> Proc:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(proc.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return proc
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"{proc.name} not serving in time:\n{proc.output()[-3000:]}")

    def fake_worker(self, *extra: str, port: int | None = None, wait: bool = True) -> Proc:
        port = port or free_port()
        args = [PYTHON, "-m", "tests.doubles.fake_worker", "--port", str(port), *extra]
        proc = self.spawn("worker", args, port, base_env())
        return self.wait_serving(proc) if wait else proc

    def auth(self, database: Path, *, port: int | None = None, **env: str) -> Proc:
        port = port or free_port()
        args = [TOKENYARD, "auth", "serve", "--port", str(port), "--migrate"]
        args += ["--database-url", f"sqlite:///{database}"]
        return self.wait_serving(self.spawn("auth", args, port, base_env(**env)))

    def router(self, auth: Proc, workers: list[Proc], *, wait: bool = True, **env: str) -> Proc:
        port = free_port()
        settings = {
            "TOKENYARD_ROUTER_PORT": str(port),
            "TOKENYARD_ROUTER_AUTH_ADDRESS": auth.address,
            "TOKENYARD_ROUTER_WORKERS": ",".join(w.address for w in workers),
            "TOKENYARD_ROUTER_USAGE_FLUSH_INTERVAL": "0.1",
            "TOKENYARD_ROUTER_EJECTION_BASE": "0.2",
        }
        settings.update(env)
        proc = self.spawn("router", [TOKENYARD, "router", "serve"], port, base_env(**settings))
        return self.wait_serving(proc) if wait else proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    lanes = Launcher(tmp_path)
    try:
        yield lanes
    finally:
        lanes.close()


def bootstrap(database: Path) -> str:
    """Run the real `tokenyard auth bootstrap`; returns the admin API key."""
    env = base_env(TOKENYARD_AUTH_BOOTSTRAP_PASSWORD="admin-password-1")
    out = subprocess.run(
        [TOKENYARD, "auth", "bootstrap", "--database-url", f"sqlite:///{database}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return out.stdout.decode().strip().splitlines()[-1].strip()


@dataclass
class User:
    """A user made through the real auth API, with one key."""

    user_id: str
    key: str
    key_id: str


def make_user(
    auth: Proc,
    admin_key: str,
    *,
    models: tuple[str, ...] = ("*",),
    limits: res.Limits | None = None,
    permissions: tuple[str, ...] = ("generate", "models.list"),
) -> User:
    """Create a role, a user holding it and an API key, as the admin."""
    name = f"u{uuid.uuid4().hex[:10]}"
    md = (("authorization", f"Bearer {admin_key}"),)
    with grpc.insecure_channel(auth.address) as channel:
        role = res.Role(
            name=f"r-{name}",
            permissions=list(permissions),
            allowed_models=list(models),
            limits=limits or res.Limits(),
        )
        roles_grpc.RoleServiceStub(channel).CreateRole(
            roles_pb.CreateRoleRequest(role=role), metadata=md
        )
        user = users_grpc.UserServiceStub(channel).CreateUser(
            users_pb.CreateUserRequest(username=name, password="user-pass-123", roles=[role.name]),
            metadata=md,
        )
        made = keys_grpc.ApiKeyServiceStub(channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(user_id=user.user.user_id, name="k"), metadata=md
        )
    return User(user.user.user_id, made.secret, made.api_key.key_id)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `key`."""
    return (("authorization", f"Bearer {key}"),)
