"""Shared test fixtures: a clean environment for every test, free ports."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _clean_environ() -> Iterator[None]:
    """Each test starts without TOKENYARD_* variables and leaves os.environ as found."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(("TOKENYARD_", "OTEL_")):
            del os.environ[key]
    yield
    os.environ.clear()
    os.environ.update(saved)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
