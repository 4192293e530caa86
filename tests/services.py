"""The machine's PostgreSQL and Redis, which tests marked `postgres` / `redis` use.

A missing service skips those tests with one line that names it and says how to
start it; `pytest --require-services` (what `make test` runs) fails them instead,
so CI cannot go green by skipping the production paths.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
REDIS_URL = "redis://127.0.0.1:6379/0"

HOW_TO_START = {
    "postgres": (
        "PostgreSQL is not answering on 127.0.0.1:5432 (trust auth, database 'test'): "
        "start it, e.g. `pg_ctlcluster 15 main start` or "
        "`docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust -e POSTGRES_DB=test "
        "postgres:15`"
    ),
    "redis": (
        "Redis is not answering on 127.0.0.1:6379: start it, e.g. "
        "`redis-server --daemonize yes` or `docker run -d -p 6379:6379 redis:7`"
    ),
}

required = False  # set by --require-services


@functools.cache
def available(service: str) -> bool:
    """Whether `service` ("postgres" or "redis") answers on its usual port."""
    try:
        if service == "postgres":
            with psycopg.connect(PG_DSN, connect_timeout=2):
                return True
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (psycopg.Error, redis.RedisError):
        return False


def require(service: str) -> None:
    """Skip (or, with --require-services, fail) the test when `service` is missing."""
    if available(service):
        return
    if required:
        pytest.fail(HOW_TO_START[service], pytrace=False)
    pytest.skip(HOW_TO_START[service])


@contextlib.contextmanager
def pg_schema(prefix: str = "t") -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL schema, dropped afterwards: (SQLAlchemy URL, schema name).

    The URL's connections use the schema (search_path) and carry its name as their
    application_name, so a test can find (and terminate) them.
    """
    require("postgres")
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield (
            (
                "postgresql+psycopg://postgres@127.0.0.1:5432/test"
                f"?options=-csearch_path%3D{schema}&application_name={schema}"
            ),
            schema,
        )
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
