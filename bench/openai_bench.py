"""HTTP (OpenAI-compatible) vs gRPC through the same router, in the same run.

One router serves both protocols over one worker; windows alternate gRPC and HTTP
at each concurrency so the machine's drifting load is shared. Reported: tokens/s of
each and their ratio, TTFT p50 of each, the TTFT HTTP adds (alternating single
requests), and the router's CPU time per streamed token for each protocol.

Parts: `relay` (test-double worker, instant tokens: the router's own cost) and
`model` (the real demo model worker).

    .venv/bin/python bench/openai_bench.py [--skip relay,model] [--seconds 3]

The HTTP client here is a minimal keep-alive HTTP/1.1 reader of server-sent events, so
that the client's own cost stays close to the gRPC client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenyard.generation.v1 import generation_service_pb2 as gen  # noqa: E402
from tokenyard.inference.v1 import worker_service_pb2 as wrk  # noqa: E402
from tokenyard.inference.v1 import worker_service_pb2_grpc as wrk_grpc  # noqa: E402

from bench.router_bench import (  # noqa: E402
    KEY,
    PY,
    STREAM,
    TOKENYARD,
    Procs,
    Result,
    _free_port,
    cpu_seconds,
    idle,
    merged,
    pct,
    router_env,
    start_auth,
    start_router,
    wait_serving,
)

MakeBody = Callable[[int, int], dict[str, Any]]


class SseConnection:
    """One keep-alive HTTP/1.1 connection posting requests and reading SSE data lines."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def events(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """POST `body`; yield each `data:` payload until [DONE] (closes on any abort)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.reader, self.writer
        assert reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        done = False
        try:
            status = await reader.readline()
            if b" 429 " in status:
                raise Full
            if b" 200 " not in status:
                raise RuntimeError(f"HTTP {status!r}")
            while await reader.readline() != b"\r\n":
                pass
            pending = b""
            while True:
                size = int((await reader.readline()).strip(), 16)
                if size == 0:
                    await reader.readline()
                    done = True
                    return
                pending += await reader.readexactly(size)
                await reader.readexactly(2)
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    data = event.removeprefix(b"data: ")
                    if data != b"[DONE]":
                        yield data
        finally:
            if not done:  # cut mid-response: this connection cannot be reused
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Full(Exception):
    """The router answered "every worker is full" (429 / RESOURCE_EXHAUSTED)."""


# One stream: (client index, request number, counts) -> None; counts first-token time
# in counts["ttft"] and tokens in counts["tokens"]; raises Full when refused for load.
OneStream = Callable[[int, int, dict[str, Any]], Awaitable[None]]


async def run_windows(
    concurrency: int,
    seconds: float,
    one: OneStream,
    *,
    pid: int | None,
    worker: str | None,
) -> Result:
    """`concurrency` clients streaming back to back; a warm-up window, then the measured one.

    Streams cut by a window's end are cancelled; the worker is let drain them before
    the measured window (the real model takes a while to free 64 cancelled sequences),
    and a refusal for load is retried after a short pause rather than ending a client.
    """
    counts: dict[str, Any] = {"messages": 0, "tokens": 0, "ttfts": [], "full": 0}

    async def client(i: int) -> None:
        n = 0
        while True:
            n += 1
            try:
                await one(i, n, counts)
            except Full:
                counts["full"] += 1
                await asyncio.sleep(0.05)

    async def window(length: float) -> float:
        tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
        start = time.monotonic()
        await asyncio.sleep(length)
        elapsed = time.monotonic() - start
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if not isinstance(result, asyncio.CancelledError):
                raise RuntimeError(f"a client failed: {result!r}")
        return elapsed

    await window(min(1.0, seconds / 3))  # connections, the router's auth cache
    if worker:
        await idle(worker)
    counts.update(messages=0, tokens=0, ttfts=[], full=0)
    cpu0 = cpu_seconds(pid) if pid else 0.0
    elapsed = await window(seconds)
    cpu = cpu_seconds(pid) - cpu0 if pid else None
    if counts["full"]:
        print(f"  ({counts['full']} refusals for load retried)", flush=True)
    return Result(counts["messages"], counts["tokens"], elapsed, counts["ttfts"], cpu)


def grpc_stream(channel: grpc.aio.Channel, make: Callable[[int, int], bytes]) -> OneStream:
    """StreamGenerate through the router, bytes in and out."""
    stream = channel.unary_stream(STREAM)
    parse = gen.StreamGenerateResponse.FromString
    md = (("authorization", f"Bearer {KEY}"),)

    async def one(i: int, n: int, counts: dict[str, Any]) -> None:
        sent = time.perf_counter()
        first = True
        try:
            async for raw in stream(make(i, n), metadata=md):
                if first:
                    counts["ttfts"].append(time.perf_counter() - sent)
                    first = False
                counts["messages"] += 1
                counts["tokens"] += len(parse(raw).token_ids)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Full from None
            raise

    return one


def http_stream(port: int, make: Callable[[int, int], bytes]) -> OneStream:
    """/v1/completions with include_usage, one keep-alive connection per client."""
    conns: dict[int, SseConnection] = {}

    async def one(i: int, n: int, counts: dict[str, Any]) -> None:
        conn = conns.setdefault(i, SseConnection(port))
        sent = time.perf_counter()
        chunks = 0
        async for data in conn.events("/v1/completions", make(i, n)):
            if chunks == 0:
                counts["ttfts"].append(time.perf_counter() - sent)
            if data.startswith(b'{"id"') and b'"choices":[]' in data:
                # The usage chunk: the stream's exact token count (chunks may merge tokens).
                counts["tokens"] += json.loads(data)["usage"]["completion_tokens"] - chunks
                continue
            chunks += 1
            counts["messages"] += 1
            counts["tokens"] += 1

    return one


async def compare(
    title: str, router: str, http_port: int, pid: int, model: str, args: argparse.Namespace,
    tokens: int, worker: str | None,
) -> None:  # fmt: skip
    """Alternating gRPC/HTTP windows per concurrency, then paired single-request TTFT."""

    def grpc_req(i: int, n: int) -> gen.StreamGenerateRequest:
        r = gen.StreamGenerateRequest(model=model, prompt=f"Count from {i} to {i + 50}: {n}")
        r.sampling.max_tokens = tokens
        r.sampling.ignore_eos = True
        r.sampling.temperature = 0
        return r

    def http_body(i: int, n: int) -> dict[str, Any]:
        return {
            "model": model, "prompt": f"Count from {i} to {i + 50}: {n}", "max_tokens": tokens,
            "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip

    md = (("authorization", f"Bearer {KEY}"),)
    channel = grpc.aio.insecure_channel(router)
    via_grpc = grpc_stream(channel, lambda i, n: grpc_req(i, n).SerializeToString())
    via_http = http_stream(http_port, lambda i, n: json.dumps(http_body(i, n)).encode())
    print(f"\n## {title}")
    print(
        "| conc | gRPC tok/s | HTTP tok/s | HTTP/gRPC (pair range) | TTFT p50 gRPC/HTTP ms "
        "| router µs CPU/token gRPC/HTTP |"
    )
    print("|---|---|---|---|---|---|")
    for conc in args.concurrency:
        grpcs: list[Result] = []
        https: list[Result] = []
        for _ in range(args.reps):
            for results, one in ((grpcs, via_grpc), (https, via_http)):
                if worker:
                    await idle(worker)
                results.append(await run_windows(conc, args.seconds, one, pid=pid, worker=worker))
        g, h = merged(grpcs), merged(https)
        g_cpu = sum(r.cpu or 0 for r in grpcs) / max(g.tokens, 1) * 1e6
        h_cpu = sum(r.cpu or 0 for r in https) / max(h.tokens, 1) * 1e6
        pairs = [b.token_rate / a.token_rate for a, b in zip(grpcs, https, strict=True)]
        print(
            f"| {conc} | {g.token_rate:,.1f} | {h.token_rate:,.1f} "
            f"| {h.token_rate / g.token_rate:.3f} ({min(pairs):.2f} to {max(pairs):.2f}) "
            f"| {pct(g.ttfts, 0.5) * 1e3:.2f} / {pct(h.ttfts, 0.5) * 1e3:.2f} "
            f"| {g_cpu:.1f} / {h_cpu:.1f} |",
            flush=True,
        )
    await channel.close()
    if worker:
        await idle(worker)
    # Added TTFT: alternating single requests (max_tokens=1), one at a time.
    added: list[float] = []
    conn = SseConnection(http_port)
    async with grpc.aio.insecure_channel(router) as channel:
        stream = channel.unary_stream(STREAM)
        for n in range(args.ttft_samples):
            req = grpc_req(0, n)
            req.sampling.max_tokens = 1
            grpc_at: list[float] = []
            start = time.perf_counter()
            async for _ in stream(req.SerializeToString(), metadata=md):
                grpc_at.append(time.perf_counter() - start)
            body = {**http_body(0, n), "max_tokens": 1}
            http_at: list[float] = []
            start = time.perf_counter()
            async for _ in conn.events("/v1/completions", json.dumps(body).encode()):
                http_at.append(time.perf_counter() - start)  # read it all: keep-alive reuse
            added.append(http_at[0] - grpc_at[0])
    conn.close()
    print(
        f"\nTTFT HTTP minus gRPC over {len(added)} alternating single requests: "
        f"p50 {pct(added, 0.5) * 1e3:+.2f} ms, p99 {pct(added, 0.99) * 1e3:+.2f} ms",
        flush=True,
    )


async def start_http_router(procs: Procs, auth: str, worker: str) -> tuple[str, int, int]:
    http_port = _free_port()
    env = router_env(auth, [worker], TOKENYARD_ROUTER_HTTP_ADDRESS=f"127.0.0.1:{http_port}")
    router, pid = await start_router(procs, env)
    return router, http_port, pid


async def part_relay(args: argparse.Namespace) -> None:
    procs = Procs()
    try:
        wport = _free_port()
        procs.start([PY, "-m", "tests.doubles.fake_worker", "--port", str(wport)])
        worker = f"127.0.0.1:{wport}"
        await wait_serving(worker)
        auth = await start_auth(procs)
        router, http_port, pid = await start_http_router(procs, auth, worker)
        title = "1. relay (test-double worker, instant tokens)"
        await compare(title, router, http_port, pid, "fake-model", args, args.tokens, None)
    finally:
        procs.stop_all()


async def part_model(args: argparse.Namespace) -> None:
    procs = Procs()
    try:
        wport = _free_port()
        argv = [TOKENYARD, "inference", "serve", "--model", args.model, "--port", str(wport)]
        argv += ["--max-running", str(max(args.concurrency))]
        threads = str(args.worker_threads)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        procs.start(argv, {"TOKENYARD_INFERENCE_PORT": str(wport), **env})
        worker = f"127.0.0.1:{wport}"
        await wait_serving(worker, timeout=600)
        auth = await start_auth(procs)
        router, http_port, pid = await start_http_router(procs, auth, worker)
        title = f"2. real model ({args.model}, {threads} torch threads of {os.cpu_count()} cores)"
        async with grpc.aio.insecure_channel(worker) as channel:
            described = await wrk_grpc.WorkerServiceStub(channel).Describe(wrk.DescribeRequest())
        model = described.model
        await compare(title, router, http_port, pid, model, args, args.model_tokens, worker)
    finally:
        procs.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma-separated parts: relay,model")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per window")
    parser.add_argument("--reps", type=int, default=2, help="alternating window pairs")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 16, 64])  # fmt: skip
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens (test double)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-tokens", type=int, default=32)
    parser.add_argument("--worker-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--ttft-samples", type=int, default=100)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    with suppress(KeyboardInterrupt):
        if "relay" not in skip:
            asyncio.run(part_relay(args))
        if "model" not in skip:
            asyncio.run(part_model(args))


if __name__ == "__main__":
    main()
