"""The `tokenyard` command: one subcommand group per service, plus tools.

Each area registers its own subcommands from `services/<area>/cli.py` through a
`register(subparsers)` function; heavy imports (torch) happen only inside the
handlers, so `tokenyard auth …` starts fast and installs without torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from services.common.settings import SettingsError

# Modules providing `register(subparsers)`, in help order.
AREAS = (
    "services.auth.cli",
    "services.auth.admin_cli",
    "services.router.cli",
    "services.inference.cli",
    "services.stack.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by tests that check compose commands)."""
    parser = argparse.ArgumentParser(
        prog="tokenyard", description="Serve large language models over gRPC."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    health = sub.add_parser("health", help="exit 0 when a gRPC server reports SERVING")
    health.add_argument("address", help="host:port of the server")
    health.add_argument("--service", default="", help="service name to check (default: server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    health.add_argument("--tls-ca", type=Path, help="CA of the server's certificate (TLS)")
    health.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    health.add_argument("--tls-key", type=Path, help="client key (mutual TLS)")
    health.set_defaults(handler=_health)
    for name in AREAS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub)
    return parser


def _health(args: argparse.Namespace) -> int:
    from services.common import health

    creds = health.credentials(args.tls_ca, args.tls_cert, args.tls_key)
    return health.run(args.address, args.service, args.timeout, creds)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tokenyard` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SettingsError as exc:
        print(f"tokenyard: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
