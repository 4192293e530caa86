"""Elastic scaling under load: workers join a running router one by one, then leave.

The scenario of tests/reliability/test_scaling.py (real `tokenyard router serve`
following a workers file re-read on SIGHUP; fake-engine worker processes with a
fixed step time; client loops added per worker joined and removed per worker
leaving, leaves alternating router-first and SIGTERM-first), but each join's
row measures the new worker's share of the requests over exactly the first
`--window` seconds after it joined (the issue's "within 10 s"). Prints the table:
streams started, completed, failed with a clean status, lost; the new worker's
share; the router's per-model queue-time p95 gauge at the end of each step.

    .venv/bin/python bench/scaling_bench.py [--peak 6] [--loops-per-worker 4]
        [--token-delay 0.05] [--max-tokens 16] [--window 10]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reliability.conftest import Stack  # noqa: E402
from tests.reliability.scaling import Scenario, Sizing, table  # noqa: E402


async def wait(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `check` (plain or async) until true; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout:.0f} s")
        await asyncio.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak", type=int, default=6)
    parser.add_argument("--loops-per-worker", type=int, default=4)
    parser.add_argument("--token-delay", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--window", type=float, default=10.0)
    args = parser.parse_args()
    sizing = Sizing(
        peak=args.peak,
        loops_per_worker=args.loops_per_worker,
        token_delay=args.token_delay,
        max_tokens=args.max_tokens,
        share_window=args.window,
    )
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp:
        stack = Stack(Path(tmp))
        scenario = Scenario(stack, sizing)
        try:
            asyncio.run(scenario.run(wait))
        finally:
            stack.close()
        print(table(scenario.steps, scenario.counts))
        fair = [1 / (i + 2) for i in range(args.peak - 1)]
        shares = [s.new_share for s in scenario.steps if s.new_share is not None]
        print(
            "new worker share vs an even split:",
            [f"{s:.0%}/{f:.0%}" for s, f in zip(shares, fair, strict=False)],
        )
    return 1 if scenario.counts.lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
