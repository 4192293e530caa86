"""Workers join and leave a running router: the workers file, SIGHUP, drain on removal."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from prometheus_client import REGISTRY
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.inference.metrics import QueueWindow
from services.router.workers import parse_workers_file
from tests.conftest import eventually
from tests.unit.router.conftest import MODEL, Stack, bearer


def request(max_tokens: int = 3) -> gen.StreamGenerateRequest:
    req = gen.StreamGenerateRequest(model=MODEL, prompt="hello")
    req.sampling.max_tokens = max_tokens
    return req


async def run(client: object, max_tokens: int = 3) -> int:
    """Tokens received by one stream."""
    count = 0
    async for msg in client.StreamGenerate(request(max_tokens), metadata=bearer()):  # type: ignore[attr-defined]
        count += len(msg.token_ids)
    return count


def test_workers_file_format() -> None:
    text = "# workers\n127.0.0.1:1\n\n127.0.0.1:2, 127.0.0.1:3  # two on a line\n"
    assert parse_workers_file(text) == {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}


def test_queue_window_quantiles_forget_old_requests() -> None:
    window = QueueWindow(window=60.0)
    assert window.quantiles(now=0.0) == (0.0, 0.0)
    for i in range(100):
        window.add(i / 100, now=10.0)
    assert window.quantiles(now=10.0) == (0.49, 0.94)
    window.add(5.0, now=65.0)
    assert window.quantiles(now=71.0) == (5.0, 5.0)  # the first hundred aged out


async def test_a_worker_added_to_the_file_joins_on_sighup(stack: Stack, tmp_path: Path) -> None:
    first = await stack.add_worker()
    second = await stack.add_worker()
    listing = tmp_path / "workers"
    listing.write_text(f"{first.address}\n")
    app = await stack.router(workers=(), workers_file=listing, dns_interval=3600.0)
    assert set(app.pool.workers) == {first.address}
    listing.write_text(f"{first.address}\n{second.address}\n")
    os.kill(os.getpid(), signal.SIGHUP)
    await eventually(lambda: len(app.pool.for_model(MODEL)) == 2, what="second worker joined")
    client = stack.client(app)
    await asyncio.gather(*(run(client) for _ in range(8)))
    assert second.generation.requests  # it takes traffic


async def test_the_file_is_polled_and_a_bad_edit_keeps_the_list(
    stack: Stack, tmp_path: Path
) -> None:
    first = await stack.add_worker()
    second = await stack.add_worker()
    listing = tmp_path / "workers"
    listing.write_text(f"{first.address}\n")
    app = await stack.router(workers=(), workers_file=listing, dns_interval=0.05)
    listing.write_text(f"{second.address}\n")
    await eventually(lambda: set(app.pool.workers) == {second.address}, what="file polled")
    listing.write_text("not an address\n")
    assert not app.pool.reload_file()
    assert set(app.pool.workers) == {second.address}


async def test_a_removed_worker_finishes_its_streams_and_gets_no_new_work(
    stack: Stack, tmp_path: Path
) -> None:
    leaving = await stack.add_worker(token_delay=0.02)
    staying = await stack.add_worker(token_delay=0.02)
    listing = tmp_path / "workers"
    listing.write_text(f"{leaving.address}\n{staying.address}\n")
    app = await stack.router(workers=(), workers_file=listing, dns_interval=3600.0)
    client = stack.client(app)
    streams = [asyncio.create_task(run(client, max_tokens=40)) for _ in range(8)]
    await eventually(lambda: len(leaving.generation.requests) > 0, what="a stream on it")
    await eventually(lambda: app.pool.workers[leaving.address].inflight > 0, what="in flight")
    listing.write_text(f"{staying.address}\n")
    assert app.pool.reload_file()
    assert leaving.address not in app.pool.workers
    assert app.pool.retiring() == 1
    later = await asyncio.gather(*(run(client) for _ in range(6)))
    assert await asyncio.gather(*streams) == [40] * 8  # the draining worker's finished
    assert later == [3] * 6
    # Nothing sent after its removal (the short requests) went to it.
    assert all(r.sampling.max_tokens == 40 for r in leaving.generation.requests)
    await eventually(lambda: app.pool.retiring() == 0, what="retired")


async def test_router_exports_worker_and_model_load_until_the_worker_leaves(
    stack: Stack, tmp_path: Path
) -> None:
    worker = await stack.add_worker()
    listing = tmp_path / "workers"
    listing.write_text(f"{worker.address}\n")
    app = await stack.router(workers=(), workers_file=listing, dns_interval=3600.0)

    def sample(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert sample("tokenyard_router_model_workers", model=MODEL) == 1
    assert sample("tokenyard_router_model_queue_seconds_p95", model=MODEL) == 0.0
    labels = {"worker": worker.address, "model": MODEL}
    assert sample("tokenyard_router_worker_kv_cache_usage_ratio", **labels) == 0.0
    listing.write_text("")
    app.pool.reload_file()
    assert sample("tokenyard_router_worker_running", **labels) is None
