"""OpenAI-compatible HTTP fixtures: real auth, workers and a router serving HTTP.

Every process is started by the router suite's `Launcher`, which stops them all
when the test (or the module) ends, failed or not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb

from tests.conftest import free_port
from tests.integration.router.conftest import Launcher, Proc, bootstrap
from tests.reliability.streams import usage_after

MODEL = "fake-model"


@dataclass
class Auth:
    """The module's auth process, its admin key and the module's launcher."""

    proc: Proc
    admin: str
    launcher: Launcher


@dataclass
class HttpRouter:
    """A router process serving gRPC and the OpenAI-compatible HTTP API."""

    proc: Proc
    http_port: int
    clients: list[openai.OpenAI | openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def client(self, key: str) -> openai.OpenAI:
        """The official client, without retries (a retry would hide the first answer)."""
        client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=60)
        self.clients.append(client)
        return client

    def async_client(self, key: str) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=60)
        self.clients.append(client)
        return client

    async def close_clients(self) -> None:
        """Close every client made so far (their connections)."""
        while self.clients:
            client = self.clients.pop()
            if isinstance(client, openai.AsyncOpenAI):
                await client.close()
            else:
                client.close()


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Auth]:
    """One real auth process (SQLite) for the module."""
    tmp = tmp_path_factory.mktemp("openai-auth")
    launcher = Launcher(tmp)
    db = tmp / "auth.db"
    admin = bootstrap(db)
    try:
        yield Auth(launcher.auth(db, TOKENYARD_AUTH_PRINCIPAL_CACHE_TTL="0"), admin, launcher)
    finally:
        launcher.close()


_ROUTERS: list[HttpRouter] = []


def http_router(launcher: Launcher, auth: Proc, workers: list[Proc], **env: str) -> HttpRouter:
    """`tokenyard router serve` with TOKENYARD_ROUTER_HTTP_ADDRESS on a free port."""
    port = free_port()
    settings: dict[str, Any] = {"TOKENYARD_ROUTER_HTTP_ADDRESS": f"127.0.0.1:{port}", **env}
    proc = launcher.router(auth, workers, **settings)
    made = HttpRouter(proc, port)
    _ROUTERS.append(made)
    return made


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    """Every openai client a test made is closed when it ends."""
    yield
    for made in _ROUTERS:
        await made.close_clients()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Processes of one test, all stopped when it ends."""
    lanes = Launcher(tmp_path)
    try:
        yield lanes
    finally:
        lanes.close()


@pytest.fixture(scope="module")
def router(auth: Auth) -> HttpRouter:
    """A router with HTTP over one fast test-double worker, for the module."""
    return http_router(auth.launcher, auth.proc, [auth.launcher.fake_worker()])


async def ledger(
    auth: Auth, user_id: str, requests: int, end_user: str = ""
) -> usage_pb.GetUsageResponse:
    """The user's usage totals (for one end user, if given) once auth has recorded
    `requests` requests."""
    return await usage_after(auth.proc, auth.admin, user_id, requests, end_user)
