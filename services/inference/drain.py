"""`tokenyard inference drain`: drain a worker and wait until it is idle (a preStop hook).

Calls `WorkerService.Drain` (the worker refuses new work and says `draining` on
every WatchLoad stream, so routers send elsewhere at once), then follows
WatchLoad until nothing runs or waits there. Kubernetes runs it before SIGTERM;
SIGTERM alone drains too (InferenceApp.stop), the hook only starts it earlier.
"""

from __future__ import annotations

import sys

import grpc
from tokenyard.inference.v1 import worker_service_pb2 as pb
from tokenyard.inference.v1 import worker_service_pb2_grpc as pb_grpc

from services.common.interceptors import SERVICE_TOKEN_HEADER


def drain(
    address: str, token: str, timeout: float, creds: grpc.ChannelCredentials | None = None
) -> int:
    """0 once the worker at `address` is drained and idle (or gone); 1 past `timeout`."""
    metadata = ((SERVICE_TOKEN_HEADER, token),) if token else ()
    channel = (
        grpc.insecure_channel(address) if creds is None else grpc.secure_channel(address, creds)
    )
    with channel:
        stub = pb_grpc.WorkerServiceStub(channel)
        try:
            reply = stub.Drain(pb.DrainRequest(), metadata=metadata, timeout=min(timeout, 10.0))
            print(f"draining: {reply.remaining} request(s) still running or queued", flush=True)
            reports = stub.WatchLoad(
                pb.WatchLoadRequest(interval_ms=200), metadata=metadata, timeout=timeout
            )
            for report in reports:
                if report.draining and report.running + report.queued == 0:
                    print("drained", flush=True)
                    return 0
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAVAILABLE:
                print("worker gone: nothing left to drain", flush=True)
                return 0
            print(f"drain: {code.name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    print("drain: the worker ended its load reports before it was idle", file=sys.stderr)
    return 1
