"""Router overhead benchmark: the same streaming workload direct and through the router.

Parts (each skippable):
1. `relay`: a test-double worker emitting tokens instantly; messages/s direct, through
   a minimal grpc.aio pass-through proxy (the baseline) and through router + auth
   (cache hit), at concurrency 1, 16 and 64, with the CPU time each proxy spends per
   relayed message (from /proc/<pid>/stat).
2. `model`: the real demo model worker (`tokenyard inference serve --model
   smollm2-135m`): tokens/s ratio and the TTFT the router adds (p50/p99).
3. `prefix`: a shared-prefix workload over several workers (test doubles whose
   prefill time follows the uncached prompt length): prefix_affinity vs least_load,
   TTFT and prefix-cache hit rate (from WatchLoad).

    .venv/bin/python bench/router_bench.py [--skip relay,model,prefix] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.inference.v1 import worker_service_pb2 as wrk
from tokenyard.inference.v1 import worker_service_pb2_grpc as wrk_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
TOKENYARD = str(Path(PY).with_name("tokenyard"))
KEY = "ty_sk_benchkey000000000000000000000"
STREAM = "/tokenyard.generation.v1.GenerationService/StreamGenerate"
TICK = os.sysconf("SC_CLK_TCK")
LOGS = Path(tempfile.mkdtemp(prefix="router-bench-"))  # child processes' output


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Procs:
    """Child processes of the benchmark, stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full = {**os.environ, "TOKENYARD_LOG_LEVEL": "error", **(env or {})}
        log = LOGS / f"{len(self.procs)}-{Path(args[2] if len(args) > 2 else args[0]).name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
        self.procs.clear()


async def wait_serving(address: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{address} not serving")


# -- the baseline: a minimal pass-through proxy ----------------------------------------


async def serve_proxy(port: int, target: str) -> None:
    """Relay StreamGenerate bytes to `target` and back, nothing else."""
    channel = grpc.aio.insecure_channel(target)
    upstream = channel.unary_stream(STREAM)  # bytes in, bytes out

    async def relay(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        call = upstream(request, timeout=context.time_remaining())
        try:
            async for raw in call:
                await context.write(raw)
        finally:
            call.cancel()

    handler = grpc.method_handlers_generic_handler(
        "tokenyard.generation.v1.GenerationService",
        {"StreamGenerate": grpc.unary_stream_rpc_method_handler(relay)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- the workload -------------------------------------------------------------------------


@dataclass
class Result:
    """One workload run against one address."""

    messages: int
    tokens: int
    seconds: float
    ttfts: list[float]
    cpu: float | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def token_rate(self) -> float:
        return self.tokens / self.seconds


async def workload(
    address: str,
    concurrency: int,
    seconds: float,
    make_request: object,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    pid: int | None = None,
) -> Result:
    """`concurrency` clients streaming back to back; what arrives within `seconds` counts.

    Streams still running when the window closes are cancelled, so long generations
    do not stretch the window; the process CPU time is read over the same window.
    """
    assert callable(make_request)
    channel = grpc.aio.insecure_channel(address)
    stream = channel.unary_stream(STREAM)
    parse = gen.StreamGenerateResponse.FromString
    counts = {"messages": 0, "tokens": 0}
    ttfts: list[float] = []

    async def client(i: int) -> None:
        n = 0
        while True:
            req = make_request(i, n)
            n += 1
            sent = time.perf_counter()
            first = True
            async for raw in stream(req.SerializeToString(), metadata=metadata):
                if first:
                    ttfts.append(time.perf_counter() - sent)
                    first = False
                counts["messages"] += 1
                counts["tokens"] += len(parse(raw).token_ids)

    async def window(length: float) -> float:
        tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
        start = time.monotonic()
        await asyncio.sleep(length)
        elapsed = time.monotonic() - start
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return elapsed

    await window(min(1.0, seconds / 3))  # warm-up: connections, router auth cache
    counts.update(messages=0, tokens=0)
    ttfts.clear()
    cpu0 = cpu_seconds(pid) if pid else 0.0
    elapsed = await window(seconds)
    cpu = cpu_seconds(pid) - cpu0 if pid else None
    await channel.close()
    return Result(counts["messages"], counts["tokens"], elapsed, ttfts, cpu)


def merged(results: Sequence[Result]) -> Result:
    """Several windows of the same workload as one."""
    return Result(
        sum(r.messages for r in results),
        sum(r.tokens for r in results),
        sum(r.seconds for r in results),
        [t for r in results for t in r.ttfts],
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- parts ---------------------------------------------------------------------------------


def router_env(auth: str, workers: Sequence[str], **extra: str) -> dict[str, str]:
    env = {
        "TOKENYARD_ROUTER_PORT": str(_free_port()),
        "TOKENYARD_ROUTER_AUTH_ADDRESS": auth,
        "TOKENYARD_ROUTER_WORKERS": ",".join(workers),
        "TOKENYARD_ROUTER_REFLECTION": "false",
    }
    env.update(extra)
    return env


async def start_auth(procs: Procs) -> str:
    port = _free_port()
    procs.start([PY, "-m", "tests.doubles.fake_auth", "--port", str(port), "--key", KEY])
    address = f"127.0.0.1:{port}"
    await wait_serving(address)
    return address


async def start_router(procs: Procs, env: dict[str, str]) -> tuple[str, int]:
    proc = procs.start([TOKENYARD, "router", "serve"], env)
    address = f"127.0.0.1:{env['TOKENYARD_ROUTER_PORT']}"
    await wait_serving(address)
    await asyncio.sleep(0.5)  # workers described and healthy
    return address, proc.pid


async def part_relay(args: argparse.Namespace) -> None:
    procs = Procs()
    try:
        wport = _free_port()
        procs.start([PY, "-m", "tests.doubles.fake_worker", "--port", str(wport)])
        worker = f"127.0.0.1:{wport}"
        await wait_serving(worker)
        auth = await start_auth(procs)
        router, router_pid = await start_router(procs, router_env(auth, [worker]))
        pport = _free_port()
        proxy = procs.start([PY, __file__, "--proxy-serve", str(pport), worker])
        proxy_addr = f"127.0.0.1:{pport}"
        await asyncio.sleep(1.0)

        def req(i: int, n: int) -> gen.StreamGenerateRequest:
            r = gen.StreamGenerateRequest(model="fake-model", prompt=f"bench {i} {n}")
            r.sampling.max_tokens = args.tokens
            return r

        auth_md = (("authorization", f"Bearer {KEY}"),)
        print("\n## 1. relay overhead (test-double worker, instant tokens)")
        print(
            "| conc | direct tok/s | proxy tok/s | router tok/s | router/direct "
            "| router msgs/s | proxy µs CPU/token | router µs CPU/token | router/proxy CPU |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for conc in args.concurrency:
            direct = await workload(worker, conc, args.seconds, req)
            base = await workload(proxy_addr, conc, args.seconds, req, pid=proxy.pid)
            via = await workload(router, conc, args.seconds, req, metadata=auth_md, pid=router_pid)
            base_us = (base.cpu or 0) / max(base.tokens, 1) * 1e6
            via_us = (via.cpu or 0) / max(via.tokens, 1) * 1e6
            print(
                f"| {conc} | {direct.token_rate:,.0f} | {base.token_rate:,.0f} "
                f"| {via.token_rate:,.0f} | {via.token_rate / direct.token_rate:.2f} "
                f"| {via.rate:,.0f} | {base_us:.1f} | {via_us:.1f} | {via_us / base_us:.2f} |",
                flush=True,
            )
        # TTFT added by each hop with no model compute to compete with for the cores.
        samples = args.ttft_samples
        hop = await paired_ttft(worker, proxy_addr, "fake-model", samples, ())
        added = await paired_ttft(worker, router, "fake-model", samples, auth_md)
        print(
            f"\nAdded TTFT over {samples} alternating single requests (test-double worker): "
            f"router p50 {pct(added, 0.5) * 1e3:+.2f} ms, p99 {pct(added, 0.99) * 1e3:+.2f} ms; "
            f"bare proxy (baseline) p50 {pct(hop, 0.5) * 1e3:+.2f} ms, "
            f"p99 {pct(hop, 0.99) * 1e3:+.2f} ms",
            flush=True,
        )
    finally:
        procs.stop_all()


async def part_model(args: argparse.Namespace) -> None:
    procs = Procs()
    try:
        wport = _free_port()
        procs.start(
            [
                TOKENYARD,
                "inference",
                "serve",
                "--model",
                args.model,
                "--port",
                str(wport),
                # Room for every stream of the highest level: the router's cost, not
                # the worker's queue (default 8 running), is what is measured.
                "--max-running",
                str(max(args.model_concurrency)),
            ],
            {
                "TOKENYARD_INFERENCE_PORT": str(wport),
                "OMP_NUM_THREADS": str(args.worker_threads),
                "MKL_NUM_THREADS": str(args.worker_threads),
            },
        )
        worker = f"127.0.0.1:{wport}"
        await wait_serving(worker, timeout=600)
        async with grpc.aio.insecure_channel(worker) as channel:
            described = await wrk_grpc.WorkerServiceStub(channel).Describe(wrk.DescribeRequest())
        model = described.model
        auth = await start_auth(procs)
        router, _ = await start_router(procs, router_env(auth, [worker]))

        def req(i: int, n: int) -> gen.StreamGenerateRequest:
            r = gen.StreamGenerateRequest(model=model, prompt=f"Count from {i} to {i + 50}:")
            r.sampling.max_tokens = args.model_tokens
            r.sampling.ignore_eos = True
            r.sampling.temperature = 0
            return r

        auth_md = (("authorization", f"Bearer {KEY}"),)
        print(
            f"\n## 2. real model worker ({model} on {described.device}, "
            f"{args.worker_threads} torch threads of {os.cpu_count()} cores)"
        )
        print(
            f"| conc | direct tok/s | router tok/s | ratio (range over {args.model_reps} pairs) "
            "| TTFT p50 direct/router ms "
            "| TTFT p99 direct/router ms | added p50 ms |"
        )
        print("|---|---|---|---|---|---|---|")
        for conc in args.model_concurrency:
            # Alternate direct and routed windows: the 2-core machine's load drifts, so
            # each side sees the same mix; the ratio is of the summed tokens.
            directs: list[Result] = []
            routed: list[Result] = []
            for _ in range(args.model_reps):
                await idle(worker)
                directs.append(await workload(worker, conc, args.model_seconds, req))
                await idle(worker)
                routed.append(
                    await workload(router, conc, args.model_seconds, req, metadata=auth_md)
                )
            direct, via = merged(directs), merged(routed)
            pairs = [v.token_rate / d.token_rate for d, v in zip(directs, routed, strict=True)]
            d50, r50 = pct(direct.ttfts, 0.5) * 1e3, pct(via.ttfts, 0.5) * 1e3
            d99, r99 = pct(direct.ttfts, 0.99) * 1e3, pct(via.ttfts, 0.99) * 1e3
            print(
                f"| {conc} | {direct.token_rate:,.1f} | {via.token_rate:,.1f} "
                f"| {via.token_rate / direct.token_rate:.3f} "
                f"({min(pairs):.2f} to {max(pairs):.2f}) | {d50:.1f} / {r50:.1f} "
                f"| {d99:.1f} / {r99:.1f} | {r50 - d50:+.2f} |",
                flush=True,
            )
        await idle(worker)
        added = await paired_ttft(worker, router, model, args.ttft_samples, auth_md)
        print(
            f"\nAdded TTFT, {len(added)} alternating single requests (max_tokens=1) direct vs "
            f"router: p50 {pct(added, 0.5) * 1e3:+.2f} ms, p99 {pct(added, 0.99) * 1e3:+.2f} ms",
            flush=True,
        )
        # The same through a bare grpc.aio pass-through proxy: what one hop costs alone.
        pport = _free_port()
        procs.start([PY, __file__, "--proxy-serve", str(pport), worker])
        await asyncio.sleep(1.0)  # the bare proxy has no health service
        await idle(worker)
        hop = await paired_ttft(worker, f"127.0.0.1:{pport}", model, args.ttft_samples, ())
        print(
            f"Added TTFT, same through a bare pass-through proxy (baseline): "
            f"p50 {pct(hop, 0.5) * 1e3:+.2f} ms, p99 {pct(hop, 0.99) * 1e3:+.2f} ms",
            flush=True,
        )
    finally:
        procs.stop_all()


async def idle(worker: str, timeout: float = 120.0) -> None:
    """Wait until the worker runs and queues nothing (cancelled streams drained)."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(worker) as channel:
        stub = wrk_grpc.WorkerServiceStub(channel)
        while time.monotonic() < deadline:
            call = stub.WatchLoad(wrk.WatchLoadRequest())
            report = await call.read()
            call.cancel()
            if isinstance(report, wrk.WatchLoadResponse) and not report.running + report.queued:
                return
            await asyncio.sleep(0.2)


async def paired_ttft(
    worker: str,
    router: str,
    model: str,
    samples: int,
    auth_md: Sequence[tuple[str, str]],
) -> list[float]:
    """Router TTFT minus direct TTFT for back-to-back identical requests, one at a time."""
    out: list[float] = []
    async with (
        grpc.aio.insecure_channel(worker) as direct,
        grpc.aio.insecure_channel(router) as routed,
    ):
        calls = [(direct.unary_stream(STREAM), ()), (routed.unary_stream(STREAM), auth_md)]
        for i in range(samples + 2):
            r = gen.StreamGenerateRequest(model=model, prompt=f"Say hello {i % 5}")
            r.sampling.max_tokens = 1
            r.sampling.temperature = 0
            raw = r.SerializeToString()
            ttft = []
            for stream, md in calls if i % 2 else calls[::-1]:
                sent = time.perf_counter()
                async for _ in stream(raw, metadata=md):
                    ttft.append(time.perf_counter() - sent)
                    break
            if i >= 2:  # warm-up pairs dropped
                out.append(ttft[1] - ttft[0] if i % 2 else ttft[0] - ttft[1])
    return out


async def part_prefix(args: argparse.Namespace) -> None:
    print(f"\n## 3. shared prefixes over {args.workers} workers")
    print("| policy | TTFT p50 ms | TTFT p99 ms | prefix-cache hit rate |")
    print("|---|---|---|---|")
    # 8 "system prompts" of ~2 kB; each request = one of them + a unique question.
    systems = [f"System prompt {s}: " + ("you are a careful assistant. " * 70) for s in range(8)]

    def req(i: int, n: int) -> gen.StreamGenerateRequest:
        prompt = systems[(i * 7 + n) % len(systems)] + f" question {i}-{n}?"
        r = gen.StreamGenerateRequest(model="fake-model", prompt=prompt)
        r.sampling.max_tokens = 8
        return r

    for policy in ("least_load", "prefix_affinity"):
        procs = Procs()
        try:
            workers = []
            for _ in range(args.workers):
                port = _free_port()
                double = [PY, "-m", "tests.doubles.fake_worker", "--port", str(port)]
                double += ["--prefill-us-per-char", "20", "--token-delay", "0.02"]
                double += ["--prefix-cache-blocks", str(args.cache_blocks)]
                procs.start(double)
                workers.append(f"127.0.0.1:{port}")
            for w in workers:
                await wait_serving(w)
            auth = await start_auth(procs)
            router, _ = await start_router(
                procs, router_env(auth, workers, TOKENYARD_ROUTER_POLICY=policy)
            )
            auth_md = (("authorization", f"Bearer {KEY}"),)
            result = await workload(router, 16, args.seconds, req, metadata=auth_md)
            hits = queries = 0
            for w in workers:
                async with grpc.aio.insecure_channel(w) as channel:
                    call = wrk_grpc.WorkerServiceStub(channel).WatchLoad(wrk.WatchLoadRequest())
                    report = await call.read()
                    call.cancel()
                    assert isinstance(report, wrk.WatchLoadResponse)
                    hits += report.prefix_cache_hits
                    queries += report.prefix_cache_queries
            print(
                f"| {policy} | {pct(result.ttfts, 0.5) * 1e3:.1f} "
                f"| {pct(result.ttfts, 0.99) * 1e3:.1f} | {hits / max(queries, 1):.1%} |",
                flush=True,
            )
        finally:
            procs.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma-separated parts: relay,model,prefix")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream (relay)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-tokens", type=int, default=64)
    parser.add_argument("--model-seconds", type=float, default=10.0)
    parser.add_argument("--model-concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="the model worker's torch threads (default: all cores but one, so the router "
        "and this client do not stall the worker's parallel kernels, as in a deployment)",
    )
    parser.add_argument("--model-reps", type=int, default=3, help="direct/router window pairs")
    parser.add_argument("--ttft-samples", type=int, default=40)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument(
        "--cache-blocks", type=int, default=100, help="prefix-cache blocks per worker (prefix)"
    )
    parser.add_argument(
        "--proxy-serve", nargs=2, metavar=("PORT", "TARGET"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.proxy_serve:
        asyncio.run(serve_proxy(int(args.proxy_serve[0]), args.proxy_serve[1]))
        return
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print(f"router benchmark on {os.cpu_count()} CPUs, {args.seconds}s per point; logs in {LOGS}")
    if "relay" not in skip:
        asyncio.run(part_relay(args))
    if "model" not in skip:
        asyncio.run(part_model(args))
    if "prefix" not in skip:
        asyncio.run(part_prefix(args))


if __name__ == "__main__":
    main()
