"""Workers join a running router one by one from 1 to 6 under rising load, then
leave (drained) back to 1 under falling load: no stream is lost, and every new
worker takes traffic within 10 s of joining. The same scenario, with fixed 10 s
windows for the share figures, is bench/scaling_bench.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tests.conftest import eventually
from tests.reliability.conftest import Stack
from tests.reliability.scaling import Scenario, Sizing, table, write_table


async def wait(check: Callable[[], object], timeout: float, what: str) -> None:
    await eventually(check, timeout, interval=0.05, what=what)  # type: ignore[arg-type]


async def test_workers_join_and_leave_under_load_and_nothing_is_lost(
    stack: Stack, report: dict[str, object]
) -> None:
    scenario = Scenario(stack, Sizing())
    waiter: Callable[[Callable[[], object], float, str], Awaitable[None]] = wait
    try:
        steps = await scenario.run(waiter)
    finally:
        text = table(scenario.steps, scenario.counts)
        write_table(stack.tmp / "scaling.txt", text)
        print("\n" + text)
    counts = scenario.counts
    report["scaling"] = {
        "started": counts.started,
        "completed": counts.completed,
        "clean_failed": counts.clean_failed,
        "lost": counts.lost,
        "new_worker_shares": [round(s.new_share, 2) for s in steps if s.new_share is not None],
    }
    assert counts.lost == 0, counts.lost_detail[:10]
    assert counts.started == counts.completed + counts.clean_failed
    joins = [s for s in steps if s.action.startswith("join")]
    assert len(joins) == 5 and all(s.new_share and s.new_share > 0 for s in joins)
    assert [s.workers for s in steps if s.action.startswith("leave")] == [5, 4, 3, 2, 1]
