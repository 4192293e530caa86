"""uvicorn inside the router's own event loop, so grpc.aio objects stay on one loop.

The socket is bound before uvicorn starts, so the port is known (port 0 works)
and reachable as soon as `start` returns; signals stay the router's. TLS follows
the router's public port settings (TOKENYARD_ROUTER_TLS_CERT/KEY/CLIENT_CA).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn


@dataclass(frozen=True)
class Tls:
    """The router's public certificate, key and (mutual TLS) client CA."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class _InLoopServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM to the process that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(address: str) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 hosts in brackets).

    Made with proto IPPROTO_TCP, as asyncio's own servers are: asyncio sets
    TCP_NODELAY only on sockets that say so, and without it the headers and the
    first event of a keep-alive response wait on the client's delayed ACK (~40 ms).
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """Serves an ASGI app on one address until `stop`."""

    def __init__(self, app: Any, address: str, *, grace: float, tls: Tls | None = None) -> None:
        self.app, self.address, self.grace, self.tls = app, address, grace, tls
        self.port = 0
        self._server: _InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        sock = bind(self.address)
        self.port = sock.getsockname()[1]
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl_certfile": str(self.tls.cert), "ssl_keyfile": str(self.tls.key)}
            if self.tls.client_ca is not None:
                tls.update(ssl_ca_certs=str(self.tls.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            self.app,
            **tls,
            lifespan="off",
            log_config=None,
            log_level="warning",  # uvicorn's start/stop lines add nothing to the router's
            access_log=False,  # our own access log carries the request id
            server_header=False,
            timeout_graceful_shutdown=max(math.ceil(self.grace), 1),
        )
        self._server = _InLoopServer(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let running responses finish (within the grace period)."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
