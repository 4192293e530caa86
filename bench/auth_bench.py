"""Authenticate throughput and latency against a no-op RPC (health Check) on the
same auth server, on SQLite and on PostgreSQL.

    .venv/bin/python bench/auth_bench.py [--seconds 5] [--concurrency 32] [--db sqlite,postgres]

Starts `tokenyard auth serve` as a real process per database, bootstraps an
admin key, then runs `concurrency` callers of each RPC (in alternating rounds,
`seconds` per RPC in all) and prints rate, p50, p99 and the ratio
Authenticate / Check (target ≥ 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenyard.auth.v1 import auth_service_pb2, auth_service_pb2_grpc

from services.auth.bootstrap import bootstrap_admin
from services.auth.settings import load_auth_settings

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PEPPER = "bench-pepper-0123456789abcdef"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure(
    call: Callable[[], Awaitable[object]], seconds: float, concurrency: int
) -> tuple[int, float, list[float]]:
    """(calls, elapsed seconds, latencies) of `call` under `concurrency` callers."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), time.perf_counter() - start, latencies


async def alternate(
    calls: dict[str, Callable[[], Awaitable[object]]], seconds: float, concurrency: int
) -> dict[str, tuple[float, float, float]]:
    """Rate, p50 and p99 (ms) of each call, measured in alternating rounds so that
    load from elsewhere on the machine hits both alike."""
    rounds = 5
    totals = {name: (0, 0.0, list[float]()) for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            n, t, lat = await measure(call, seconds / rounds, concurrency)
            pn, pt, plat = totals[name]
            totals[name] = (pn + n, pt + t, plat + lat)
    out = {}
    for name, (n, t, lat) in totals.items():
        q = statistics.quantiles(lat, n=100)
        out[name] = (n / t, q[49] * 1000, q[98] * 1000)
    return out


async def bench_one(
    url: str, seconds: float, concurrency: int, cache: bool = True
) -> dict[str, float]:
    """Run the server on `url` and measure both RPCs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENYARD_")}
    env.update(
        TOKENYARD_AUTH_DATABASE_URL=url,
        TOKENYARD_AUTH_KEY_PEPPER=PEPPER,
        TOKENYARD_LOG_LEVEL="warning",
    )
    if not cache:
        env["TOKENYARD_AUTH_PRINCIPAL_CACHE_TTL"] = "0"
    settings = load_auth_settings(env)
    key = await bootstrap_admin(settings, "admin", "bench-admin-password")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "auth", "serve", "--port", str(port),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            auth = auth_service_pb2_grpc.AuthServiceStub(channel)
            check_req = health_pb2.HealthCheckRequest()
            auth_req = auth_service_pb2.AuthenticateRequest(credential=key)
            await health.Check(check_req, wait_for_ready=True, timeout=30)
            for _ in range(200):  # warm up both paths (and the principal cache)
                await health.Check(check_req)
                await auth.Authenticate(auth_req)
            got = await alternate(
                {
                    "noop": lambda: health.Check(check_req),
                    "auth": lambda: auth.Authenticate(auth_req),
                },
                seconds,
                concurrency,
            )
            noop, authn = got["noop"], got["auth"]
    finally:
        proc.terminate()
        await proc.wait()
    return {
        "noop_rps": noop[0],
        "noop_p50": noop[1],
        "noop_p99": noop[2],
        "auth_rps": authn[0],
        "auth_p50": authn[1],
        "auth_p99": authn[2],
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--db", default="sqlite,postgres")
    parser.add_argument(
        "--no-cache", action="store_true", help="every Authenticate reads the database"
    )
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for db in args.db.split(","):
            schema = ""
            if db == "sqlite":
                url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            else:
                schema = f"bench_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(PG_DSN, autocommit=True) as conn:
                    conn.execute(f"CREATE SCHEMA {schema}")
                url = (
                    "postgresql+psycopg://postgres@127.0.0.1:5432/test"
                    f"?options=-csearch_path%3D{schema}"
                )
            try:
                r = await bench_one(url, args.seconds, args.concurrency, not args.no_cache)
            finally:
                if schema:
                    with psycopg.connect(PG_DSN, autocommit=True) as conn:
                        conn.execute(f"DROP SCHEMA {schema} CASCADE")
            ratio = r["auth_rps"] / r["noop_rps"]
            failed |= ratio < 0.5
            print(
                f"{db:9s} health.Check {r['noop_rps']:8.0f}/s p50 {r['noop_p50']:.2f} ms "
                f"p99 {r['noop_p99']:.2f} ms | Authenticate {r['auth_rps']:8.0f}/s "
                f"p50 {r['auth_p50']:.2f} ms p99 {r['auth_p99']:.2f} ms | ratio {ratio:.2f}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
