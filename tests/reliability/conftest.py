"""Reliability fixtures: the whole stack as real processes on free loopback ports.

`Stack` extends the router suite's process `Launcher` with auth on any database
URL (SQLite file or a PostgreSQL schema), fake-engine workers (the real worker
gRPC layer over `tests.reliability.fake_engine_worker.FakeEngine`), restarts on
the same port, and a scan of every process's log for the secrets the test made.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from tokenyard.inference.v1 import worker_service_pb2 as wrk
from tokenyard.inference.v1 import worker_service_pb2_grpc as wrk_grpc

from services.common.interceptors import SERVICE_TOKEN_HEADER
from tests import services
from tests.conftest import free_port
from tests.integration.router.conftest import (
    PEPPER,
    PYTHON,
    ROOT,
    SERVICE_TOKEN,
    TOKENYARD,
    Launcher,
    Proc,
    User,
    base_env,
    make_user,
)

ADMIN_PASSWORD = "admin-password-1"
USER_PASSWORD = "user-pass-123"  # what make_user gives every user
MODEL = "fake-model"
LOG_LEVEL = "info"
SERVICE_MD = ((SERVICE_TOKEN_HEADER, SERVICE_TOKEN),)


def digest(secret: str) -> str:
    """The key digest auth stores (HMAC-SHA256 with the test pepper), for the log scan."""
    return hmac.new(PEPPER.encode(), secret.encode(), hashlib.sha256).hexdigest()


class Secret(str):
    """A key or password: usable as a string, shown as *** in reprs and tracebacks."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


@dataclass
class Stack(Launcher):
    """Starts the stack's processes, restarts them, and scans their logs for secrets."""

    specs: dict[int, tuple[str, list[str], dict[str, str]]] = field(
        default_factory=dict, repr=False
    )
    secrets: set[str] = field(default_factory=set, repr=False)

    def spawn(self, name: str, args: list[str], port: int, env: dict[str, str]) -> Proc:
        proc = super().spawn(name, args, port, env)
        self.specs[id(proc)] = (name, args, env)
        return proc

    def auth_url(self, url: str, *, port: int | None = None, **env: str) -> Proc:
        """`tokenyard auth serve --migrate` on `url` (logs at info)."""
        port = port or free_port()
        args = [TOKENYARD, "auth", "serve", "--port", str(port), "--migrate"]
        args += ["--database-url", url]
        proc = self.spawn("auth", args, port, base_env(**{"TOKENYARD_LOG_LEVEL": LOG_LEVEL, **env}))
        return self.wait_serving(proc)

    def engine_worker(self, *extra: str, delay: float = 0.02, wait: bool = True) -> Proc:
        """A fake-engine worker process (real worker servicers) on a free port."""
        port = free_port()
        args = [PYTHON, "-m", "tests.reliability.fake_engine_worker", "--port", str(port)]
        args += ["--token-delay", str(delay), *extra]
        proc = self.spawn("worker", args, port, base_env(TOKENYARD_LOG_LEVEL=LOG_LEVEL))
        return self.wait_serving(proc) if wait else proc

    def start_router(self, auth: Proc, workers: list[Proc], **env: str) -> Proc:
        """`tokenyard router serve` over `workers` (logs at info, fast usage flushes)."""
        settings: dict[str, Any] = {"TOKENYARD_LOG_LEVEL": LOG_LEVEL, **env}
        return self.router(auth, workers, **settings)

    def restart(self, proc: Proc, *, wait: bool = True) -> Proc:
        """Start `proc`'s command again on its port (after it was stopped or killed)."""
        proc.popen.wait(30)
        name, args, env = self.specs[id(proc)]
        again = self.spawn(name, args, proc.port, env)
        return self.wait_serving(again) if wait else again

    def bootstrap(self, url: str) -> str:
        """Run the real `tokenyard auth bootstrap`; returns the admin key (a secret)."""
        env = base_env(TOKENYARD_AUTH_BOOTSTRAP_PASSWORD=ADMIN_PASSWORD)
        log = self.tmp / f"bootstrap-{uuid.uuid4().hex[:6]}.log"
        with log.open("wb") as err:
            out = subprocess.run(
                [TOKENYARD, "auth", "bootstrap", "--database-url", url],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
                check=True,
                timeout=120,
            )
        key = Secret(out.stdout.decode().strip().splitlines()[-1].strip())
        self.secrets.add(key)
        return key

    def user(self, auth: Proc, admin: str, **kwargs: object) -> User:
        """`make_user` of the router suite, remembering the key as a secret."""
        made = make_user(auth, admin, **kwargs)  # type: ignore[arg-type]
        made.key = Secret(made.key)
        self.secrets.add(made.key)
        return made

    def leaks(self) -> list[str]:
        """`file: what` for every secret or key digest found in any process's log."""
        needles = {PEPPER: "pepper", SERVICE_TOKEN: "service token"}
        needles[ADMIN_PASSWORD] = "admin password"
        needles[USER_PASSWORD] = "user password"
        for secret in self.secrets:
            needles[secret] = f"secret {secret[:6]}…"
            needles[digest(secret)] = f"digest of {secret[:6]}…"
        found = []
        for log in sorted(self.tmp.glob("*.log")):
            text = log.read_text(errors="replace")
            found += [f"{log.name}: {what}" for needle, what in needles.items() if needle in text]
        return found


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A Stack for one test; every log is scanned for secrets when it ends."""
    with stack_for(tmp_path) as running:
        yield running


class stack_for:
    """Run a Stack in `tmp`; close its processes, then fail if any log leaked a secret."""

    def __init__(self, tmp: Path) -> None:
        self.stack = Stack(tmp)

    def __enter__(self) -> Stack:
        return self.stack

    def __exit__(self, *exc: object) -> None:
        self.stack.close()
        leaks = self.stack.leaks()
        assert not leaks, f"secrets in logs: {leaks}"


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL schema for one test: (database URL, application name)."""
    with services.pg_schema("rel") as made:
        yield made


def load_of(worker: Proc, timeout: float = 5.0) -> wrk.WatchLoadResponse:
    """The worker's current load: the first report of a WatchLoad stream."""
    with grpc.insecure_channel(worker.address) as channel:
        stream = wrk_grpc.WorkerServiceStub(channel).WatchLoad(
            wrk.WatchLoadRequest(interval_ms=50), metadata=SERVICE_MD, timeout=timeout
        )
        try:
            first: wrk.WatchLoadResponse = next(stream)
        finally:
            stream.cancel()
    return first


def kill(proc: Proc) -> None:
    """SIGKILL `proc` and reap it."""
    proc.signal(signal.SIGKILL)
    proc.popen.wait(30)


__all__ = [
    "MODEL",
    "SERVICE_MD",
    "Proc",
    "Stack",
    "User",
    "kill",
    "load_of",
    "stack_for",
]


_REPORT: dict[str, object] = {}


@pytest.fixture
def report() -> dict[str, object]:
    """Figures a test reports; printed at the end of the run (and written to
    TOKENYARD_RELIABILITY_REPORT as JSON when that names a file)."""
    return _REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the reliability figures gathered during the run."""
    if not _REPORT:
        return
    terminalreporter.section("reliability figures")
    for name, figures in _REPORT.items():
        terminalreporter.write_line(f"{name}: {figures}")
    target = os.environ.get("TOKENYARD_RELIABILITY_REPORT")
    if target:
        Path(target).write_text(json.dumps(_REPORT, indent=2, default=str))
