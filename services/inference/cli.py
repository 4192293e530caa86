"""`tokenyard inference serve`: load one model and serve it to the router."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `inference` command group to the `tokenyard` parser."""
    from services.common.settings import add_flags
    from services.inference.settings import SERVICE, InferenceSettings

    group = subparsers.add_parser("inference", help="an inference worker")
    sub = group.add_subparsers(dest="inference_command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="load a model and serve GenerationService and WorkerService to the router",
        description="Settings come from TOKENYARD_INFERENCE_* variables; flags override them.",
    )
    add_flags(serve, InferenceSettings, SERVICE)
    serve.set_defaults(handler=_serve)
    drain = sub.add_parser(
        "drain",
        help="drain a worker (no new work, running streams finish) and wait until it is "
        "idle: the Kubernetes preStop hook",
        description="The service token comes from TOKENYARD_SERVICE_TOKEN.",
    )
    drain.add_argument("address", help="host:port of the worker")
    drain.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for idle")
    drain.add_argument("--tls-ca", type=Path, help="CA of the worker's certificate (TLS)")
    drain.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    drain.add_argument("--tls-key", type=Path, help="client key (mutual TLS)")
    drain.set_defaults(handler=_drain)


def _drain(args: argparse.Namespace) -> int:
    from services.common import health
    from services.inference.drain import drain

    creds = health.credentials(args.tls_ca, args.tls_cert, args.tls_key)
    token = os.environ.get("TOKENYARD_SERVICE_TOKEN", "")
    return drain(args.address, token, args.timeout, creds)


def _serve(args: argparse.Namespace) -> int:
    from services.inference.settings import load_inference_settings

    settings = load_inference_settings(os.environ, vars(args))
    return asyncio.run(_run(settings))


async def _run(settings: Any) -> int:
    from services.common.lifecycle import observe, serve
    from services.common.telemetry import shutdown_telemetry
    from services.inference.app import InferenceApp, load
    from services.inference.engine.families import UnsupportedModelError
    from services.inference.engine.threads import confine_torch_threads
    from services.inference.model_loading import ModelLoadError

    observe("inference", settings.observability)
    compute_threads = confine_torch_threads()  # before any torch work: see threads.py
    try:
        loaded = await asyncio.to_thread(load, settings)
        app = InferenceApp(settings, loaded, compute_threads=compute_threads, owns_model=True)
    except (ModelLoadError, UnsupportedModelError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if not isinstance(exc, ModelLoadError):  # its messages name the model already
            reason = f"cannot serve model {settings.model!r}: {reason}"
        print(f"tokenyard: {reason}", file=sys.stderr)
        shutdown_telemetry()
        return 1

    async def make() -> InferenceApp:
        return app

    await serve("inference", settings.server, make)
    return 0
