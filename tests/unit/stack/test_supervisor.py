"""Process supervision of `tokenyard up`, with small real child processes."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from pathlib import Path

import pytest

from services.stack.supervisor import ChildSpec, Policy, StackError, Supervisor
from tests.conftest import eventually, free_port

CHILD = str(Path(__file__).with_name("health_child.py"))
FAST = Policy(max_restarts=2, backoff=0.1, startup_timeout=20, stop_timeout=10)


def spec(name: str, log: Path, order: int, *extra: str) -> ChildSpec:
    port = free_port()
    return ChildSpec(
        name=name,
        argv=[sys.executable, CHILD, str(port), name, str(log), *extra],
        env=dict(os.environ),
        health_target=f"127.0.0.1:{port}",
        stop_order=order,
    )


async def test_children_start_in_order_log_with_prefixes_and_stop_router_first(
    tmp_path: Path,
) -> None:
    log = tmp_path / "stops"
    out = io.StringIO()
    sup = Supervisor(
        [spec("auth", log, 2), spec("worker-1", log, 1), spec("router", log, 0)], FAST, out
    )
    await sup.start()
    assert all(c.running for c in sup.children)
    await sup.stop()
    assert log.read_text().splitlines() == ["router stopped", "worker-1 stopped", "auth stopped"]
    lines = out.getvalue().splitlines()
    assert "auth     | auth serving" in lines and "router   | router serving" in lines
    assert not any(c.running for c in sup.children)


async def test_a_killed_child_is_restarted_and_serves_again(tmp_path: Path) -> None:
    log = tmp_path / "stops"
    out = io.StringIO()
    sup = Supervisor([spec("worker-1", log, 0)], FAST, out)
    await sup.start()
    child = sup.children[0]
    first_pid = child.proc.pid if child.proc else 0
    os.kill(first_pid, signal.SIGKILL)
    runner = asyncio.create_task(sup.run())
    await eventually(
        lambda: (
            bool(child.proc)
            and child.proc.pid != first_pid  # type: ignore[union-attr]
            and "SERVING again" in out.getvalue()
        ),
        interval=0.05,
    )
    assert "worker-1 exited with code -9; restarting" in out.getvalue()
    assert "worker-1 is SERVING again" in out.getvalue()
    assert child.running
    sup.request_stop()
    await runner
    await sup.stop()
    assert not child.running


async def test_a_child_that_keeps_dying_stops_the_whole_stack(tmp_path: Path) -> None:
    log = tmp_path / "stops"
    out = io.StringIO()
    steady = spec("auth", log, 1)
    crash = tmp_path / "crash"
    flaky = spec("worker-1", log, 0, "--die-if", str(crash))
    sup = Supervisor([steady, flaky], FAST, out)
    await sup.start()
    crash.touch()
    with pytest.raises(StackError, match="worker-1 exited with code 1 and was restarted 2 times"):
        await sup.run()
    await sup.stop()
    assert "auth stopped" in log.read_text()
    assert not any(c.running for c in sup.children)


async def test_a_child_that_fails_to_start_is_named(tmp_path: Path) -> None:
    log = tmp_path / "stops"
    out = io.StringIO()
    sup = Supervisor([spec("auth", log, 1), spec("worker-1", log, 0, "--fail-start")], FAST, out)
    with pytest.raises(StackError, match="worker-1 exited with code 3"):
        await sup.start()
    await sup.stop()
    assert "worker-1 | cannot load model" in out.getvalue()
    assert not any(c.running for c in sup.children)


async def test_stop_during_startup_returns_promptly() -> None:
    out = io.StringIO()
    never = ChildSpec(
        name="slow",
        argv=[sys.executable, "-c", "import time; time.sleep(60)"],
        env=dict(os.environ),
        health_target=f"127.0.0.1:{free_port()}",
    )
    sup = Supervisor([never], FAST, out)
    starting = asyncio.create_task(sup.start())
    await eventually(lambda: sup.children[0].running)  # started, waiting for its health
    sup.request_stop()
    await starting
    await sup.stop()
    assert not sup.children[0].running
