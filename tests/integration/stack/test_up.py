"""`tokenyard up` failing to start: a clear message, nothing left running."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import psycopg
import pytest

from tests.integration.stack.launcher import READY, StackProcess, run_cli
from tests.services import PG_DSN, REDIS_URL, pg_schema


def test_a_model_that_cannot_load_stops_the_stack_with_a_message(tmp_path: Path) -> None:
    stack = StackProcess(tmp_path / "state", tmp_path / "no-such-model")
    try:
        code = stack.proc.wait(120)
    finally:
        stack.stop()
    assert code == 1
    assert "error: worker-1 exited with code" in stack.output
    assert not stack.children()


@pytest.mark.postgres
@pytest.mark.redis
def test_up_runs_auth_on_postgresql_and_limits_on_redis(tiny_model: Path, tmp_path: Path) -> None:
    """What a user sets is what runs: `--database-url` and `TOKENYARD_REDIS_URL` are honoured
    (before, auth silently stayed on SQLite in the state folder)."""
    with pg_schema("up") as (url, schema):
        stack = StackProcess(
            tmp_path / "state",
            tiny_model,
            extra=["--database-url", url],
            env={"TOKENYARD_REDIS_URL": REDIS_URL},
        )
        try:
            stack.wait_for(READY)
            with psycopg.connect(PG_DSN) as conn:
                users = conn.execute(f"SELECT username FROM {schema}.users").fetchall()
            metrics = f"http://127.0.0.1:{stack.metrics_port}/metrics"  # the router's
            with urllib.request.urlopen(metrics, timeout=10) as reply:
                text = reply.read().decode()
        finally:
            stack.stop()
    assert {"admin"} <= {u for (u,) in users}
    assert not (tmp_path / "state" / "auth.db").exists()
    assert "tokenyard_router_limits_redis_up 1.0" in text


def test_up_refuses_a_variable_it_would_replace(tiny_model: Path, tmp_path: Path) -> None:
    done = run_cli(
        "up", "--state-dir", str(tmp_path / "state"), "--model", str(tiny_model),
        env={"TOKENYARD_ROUTER_PORT": "6123"},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "tokenyard: configuration error: TOKENYARD_ROUTER_PORT: `tokenyard up` sets this "
        "itself for its router service; unset it and use `tokenyard up`'s flags "
        "(see tokenyard up --help)"
    ]
