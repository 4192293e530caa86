"""A stand-in service for supervisor tests: a real gRPC health server in its own process.

`python health_child.py PORT NAME LOG [--die-if FILE] [--fail-start]` serves health
SERVING on PORT, prints a line, appends `NAME stopped` to LOG on SIGTERM, and
exits with code 1 ("crashes") whenever FILE exists.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
    parser.add_argument("--die-if", default=None)
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
    while not stop.is_set():
        if args.die_if and os.path.exists(args.die_if):  # noqa: ASYNC240 - a stat, tiny
            print("crashing", flush=True)
            return 1
        await asyncio.sleep(0.1)
    await server.stop(0)
    with open(args.log, "a") as f:  # noqa: ASYNC230 - the server has stopped
        f.write(f"{args.name} stopped\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
