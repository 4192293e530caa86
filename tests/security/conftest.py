"""Security suite fixtures: the auth integration fixtures (a fresh SQLite file or
PostgreSQL schema per test, a real auth gRPC server on loopback, a bootstrapped
admin), shared so each attack runs against the real service on both databases."""

from __future__ import annotations

from tests.integration.auth.conftest import database_url, settings, svc

__all__ = ["database_url", "settings", "svc"]
