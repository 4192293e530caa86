"""A stand-in service for supervisor tests: a real gRPC health server in its own process.

`python health_child.py PORT NAME LOG [--die-after S] [--fail-start]` serves health
SERVING on PORT, prints a line, and appends `NAME stopped` to LOG on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("name")
    parser.add_argument("log")
    parser.add_argument("--die-after", type=float, default=None)
    parser.add_argument("--fail-start", action="store_true")
    args = parser.parse_args()
    if args.fail_start:
        print("cannot load model", flush=True)
        return 3
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"{args.name} serving", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.die_after)
    except TimeoutError:
        print("crashing", flush=True)
        return 1
    await server.stop(0)
    with open(args.log, "a") as f:  # noqa: ASYNC230 - the server has stopped
        f.write(f"{args.name} stopped\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
