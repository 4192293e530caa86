"""Shared test fixtures: a clean environment for every test, free ports, and no
gRPC server or channel outliving the test that made it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest

from tests import services


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-services",
        action="store_true",
        help="fail, instead of skip, tests whose PostgreSQL or Redis is not running",
    )


def pytest_configure(config: pytest.Config) -> None:
    services.required = bool(config.getoption("--require-services"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for service in ("postgres", "redis"):
        if item.get_closest_marker(service) is not None:
            services.require(service)


@pytest.fixture(autouse=True)
def _clean_environ() -> Iterator[None]:
    """Each test starts without TOKENYARD_* variables and leaves os.environ as found."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(("TOKENYARD_", "OTEL_")):
            del os.environ[key]
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
async def _no_leaked_grpc(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Stop every grpc.aio server and close every channel a test made, even when it failed.

    A server left running is garbage-collected during a later test, on a closed
    event loop, and its warning fails that innocent test: one failure would
    cascade. Objects bound to another loop (a thread's) belong to that thread.
    """
    made: list[Any] = []

    def tracked(factory: Any) -> Any:
        def make(*args: Any, **kwargs: Any) -> Any:
            obj = factory(*args, **kwargs)
            made.append(obj)
            return obj

        return make

    for name in ("server", "insecure_channel", "secure_channel"):
        monkeypatch.setattr(grpc.aio, name, tracked(getattr(grpc.aio, name)))
    yield
    loop = asyncio.get_running_loop()
    for obj in reversed(made):
        if getattr(obj, "_loop", loop) is not loop:
            continue
        with contextlib.suppress(Exception):
            if isinstance(obj, grpc.aio.Server):
                await obj.stop(0)
            else:
                await obj.close()


# How long a test waits for a condition before failing: generous, since a wait
# ends as soon as the condition holds and a starved 2-core machine is slow.
WAIT_TIMEOUT = 60.0


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    timeout: float = WAIT_TIMEOUT,
    interval: float = 0.01,
    what: str = "condition",
) -> None:
    """Wait until `check()` (plain or async) holds, polling every `interval` s;
    fail the test after `timeout` seconds. The one polling loop of the suite."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        if loop.time() > deadline:
            pytest.fail(f"{what} not reached in {timeout:.0f} s")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
