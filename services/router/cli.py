"""`tokenyard router serve`: the public front door (port 50051 by default)."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `router` command group to the `tokenyard` parser."""
    from services.common.settings import add_flags
    from services.router.settings import RouterSettings

    router = subparsers.add_parser("router", help="the public router")
    sub = router.add_subparsers(dest="router_command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve GenerationService: authenticate, limit and route to workers",
        description="Settings come from TOKENYARD_ROUTER_* variables; flags override them.",
    )
    add_flags(serve, RouterSettings, "router")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from services.common.settings import load_settings
    from services.router.settings import RouterSettings

    settings = load_settings(RouterSettings, os.environ, vars(args), service="router")
    asyncio.run(_run(settings))
    return 0


async def _run(settings: Any) -> None:
    from services.common.lifecycle import observe, serve
    from services.router.app import RouterApp

    observe("router", settings.observability)

    async def make() -> RouterApp:
        return RouterApp(settings)

    def http(app: RouterApp) -> list[str]:
        if app.http_address is None:
            return []
        return [f"OpenAI-compatible HTTP API on http://{app.http_address}/v1"]

    await serve("router", settings.server, make, http)
