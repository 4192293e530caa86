"""One lifecycle for every service: observability → app → serve → signal → graceful stop.

`tokenyard auth|router|inference serve` each build their settings and their app,
then hand both to `serve()`, so logging, telemetry, the Prometheus endpoint,
signal handling and the order of shutdown are the same for all three.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Protocol, TypeVar

from services.common.config import ObservabilitySettings, ServerSettings
from services.common.server import GrpcServer


class ServiceApp(Protocol):
    """What a service's app offers the lifecycle (AuthApp, RouterApp, InferenceApp)."""

    server: GrpcServer

    @property
    def address(self) -> str: ...

    async def start(self) -> int: ...

    async def stop(self, grace: float | None = None) -> None: ...


A = TypeVar("A", bound=ServiceApp)


def observe(service: str, obs: ObservabilitySettings) -> None:
    """Configure logging and tracing for `service`; first thing a command does."""
    from services.common.logs import configure_logging
    from services.common.telemetry import configure_telemetry

    configure_logging(service, obs.log_level, obs.log_format)
    configure_telemetry(service, obs.otlp_endpoint)


@contextlib.contextmanager
def metrics_endpoint(server: ServerSettings) -> Iterator[None]:
    """Serve Prometheus /metrics on the configured port (none when unset), then stop it."""
    if server.metrics_port is None:
        yield
        return
    from prometheus_client import start_http_server

    http, thread = start_http_server(server.metrics_port, addr=server.host)
    try:
        yield
    finally:
        http.shutdown()
        thread.join(5)


async def serve(
    service: str,
    server: ServerSettings,
    make_app: Callable[[], Awaitable[A]],
    also: Callable[[A], Iterable[str]] = lambda _app: (),
) -> None:
    """Build the app, serve until SIGTERM/SIGINT, stop gracefully; always flush telemetry.

    `observe()` must have run first (building the app may log). Once serving it
    prints where it listens, then the lines `also(app)` gives (other endpoints).
    """
    from services.common.telemetry import shutdown_telemetry

    try:
        with metrics_endpoint(server):
            app = await make_app()
            try:
                await app.start()
                print(f"tokenyard {service} listening on {app.address}", flush=True)
                for line in also(app):
                    print(line, flush=True)
                await app.server.wait_for_stop_signal()
            finally:
                await app.stop()
    finally:
        shutdown_telemetry()
