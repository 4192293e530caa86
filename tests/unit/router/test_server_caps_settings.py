"""The router's request-size and RPC caps: variables and flags reach the server options."""

from __future__ import annotations

import argparse

from services.common.settings import load_settings
from services.router import cli
from services.router.settings import RouterSettings


def settings(argv: list[str], environ: dict[str, str]) -> RouterSettings:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = vars(parser.parse_args(["router", "serve", *argv]))
    overrides = {k: (str(v) if isinstance(v, int) else v) for k, v in args.items()}
    return load_settings(RouterSettings, environ, overrides, service="router")


def test_caps_come_from_variables_and_flags() -> None:
    env = {
        "TOKENYARD_ROUTER_MAX_REQUEST_BYTES": "65536",
        "TOKENYARD_ROUTER_MAX_STREAMS_PER_CONNECTION": "8",
        "TOKENYARD_ROUTER_MAX_CONCURRENT_RPCS": "64",
    }
    server = settings(["--max-concurrent-rpcs", "32"], env).server
    assert (server.max_request_bytes, server.max_streams_per_connection) == (65536, 8)
    assert server.max_concurrent_rpcs == 32  # the flag wins
    assert server.grpc_options() == {
        "grpc.max_receive_message_length": 65536,
        "grpc.max_concurrent_streams": 8,
    }


def test_caps_have_bounded_defaults() -> None:
    server = settings([], {}).server
    assert server.max_request_bytes < server.max_message_bytes
    assert server.max_streams_per_connection <= 1000
    assert server.max_concurrent_rpcs <= 100_000
