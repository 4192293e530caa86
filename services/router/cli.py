"""`tokenyard router serve`: the public front door (port 50051 by default)."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `router` command group to the `tokenyard` parser."""
    router = subparsers.add_parser("router", help="the public router")
    sub = router.add_subparsers(dest="router_command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve GenerationService: authenticate, limit and route to workers",
        description="Settings come from TOKENYARD_ROUTER_* variables; flags override them.",
    )
    serve.add_argument("--port", type=int, default=None, help="gRPC port (default 50051)")
    serve.add_argument("--auth-address", default=None, help="auth host:port")
    serve.add_argument("--workers", default=None, help="comma-separated worker host:port")
    serve.add_argument("--worker-dns", default=None, help="worker DNS name:port")
    serve.add_argument("--policy", default=None, help="least_load|prefix_affinity|...")
    serve.add_argument("--stream-interval", default=None, help="tokens per client message")
    serve.add_argument(
        "--max-request-bytes", default=None, help="largest request read before authentication"
    )
    serve.add_argument(
        "--max-streams-per-connection", default=None, help="concurrent RPCs per connection"
    )
    serve.add_argument("--max-concurrent-rpcs", default=None, help="concurrent RPCs in total")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from services.common.settings import load_settings
    from services.router.settings import RouterSettings

    overrides = {k: (str(v) if isinstance(v, int) else v) for k, v in vars(args).items()}
    settings = load_settings(RouterSettings, os.environ, overrides, service="router")
    asyncio.run(_run(settings))
    return 0


async def _run(settings: Any) -> None:
    from prometheus_client import start_http_server

    from services.common.logs import configure_logging
    from services.common.telemetry import configure_telemetry, shutdown_telemetry
    from services.router.app import RouterApp

    obs = settings.observability
    configure_logging("router", obs.log_level, obs.log_format)
    configure_telemetry("router", obs.otlp_endpoint)
    if settings.server.metrics_port is not None:
        start_http_server(settings.server.metrics_port, addr=settings.server.host)
    app = RouterApp(settings)
    try:
        await app.start()
        print(f"tokenyard router listening on {app.address}", flush=True)
        await app.server.wait_for_stop_signal()
    finally:
        await app.stop()
        shutdown_telemetry()
