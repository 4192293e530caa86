"""Router unit fixtures: a real router in-process over test-double auth and workers."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from services.router.app import RouterApp
from services.router.settings import RouterServerSettings, RouterSettings
from tests.doubles.fake_auth import FakeAuth, principal
from tests.doubles.fake_worker import FakeWorker, FakeWorkerConfig

KEY = "ty_sk_testkey0000000000000000000001"
MODEL = "fake-model"


def bearer(key: str = KEY) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `key`."""
    return (("authorization", f"Bearer {key}"),)


class Stack:
    """Fake auth, fake workers and routers started on loopback; all stopped at the end."""

    def __init__(self) -> None:
        self.auth = FakeAuth()
        self.workers: list[FakeWorker] = []
        self.routers: list[RouterApp] = []
        self.channels: list[grpc.aio.Channel] = []

    async def start_auth(self) -> None:
        await self.auth.start()
        self.auth.state.add_key(KEY, principal("cred-1"))

    async def add_worker(self, **config: Any) -> FakeWorker:
        cfg = FakeWorkerConfig(**config)
        worker = FakeWorker(cfg)
        await worker.start()
        self.workers.append(worker)
        return worker

    async def router(
        self, *, wait: bool = True, clock: Callable[[], float] = time.time, **overrides: Any
    ) -> RouterApp:
        server = RouterServerSettings(port=0, grace_period=1.0, reflection=False)
        base = RouterSettings(
            server=server,
            auth_address=self.auth.address,
            workers=tuple(w.address for w in self.workers),
            usage_flush_interval=0.05,
            ejection_base=0.2,
        )
        app = RouterApp(dataclasses.replace(base, **overrides), clock=clock)
        await app.start()
        self.routers.append(app)
        if wait and app.pool.workers:
            assert await app.pool.wait_ready()
        if wait:
            await app.auth.revocations_connected.wait()
        return app

    def client(self, app: RouterApp) -> gen_grpc.GenerationServiceStub:
        channel = grpc.aio.insecure_channel(app.address)
        self.channels.append(channel)
        return gen_grpc.GenerationServiceStub(channel)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for app in self.routers:
            await app.stop(0)
        for worker in self.workers:
            await worker.stop()
        await self.auth.stop()


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = Stack()
    await s.start_auth()
    try:
        yield s
    finally:
        await s.close()
