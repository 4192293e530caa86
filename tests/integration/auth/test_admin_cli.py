"""`tokenyard users|roles|keys|audit` as real processes against a real server."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.auth.bootstrap import bootstrap_admin
from tests.integration.auth.conftest import ADMIN_PASSWORD, Auth, make_settings, running


@pytest.fixture
async def sqlite_svc(tmp_path: Path) -> AsyncIterator[Auth]:
    settings = make_settings(f"sqlite:///{tmp_path / 'cli.db'}")
    key = await bootstrap_admin(settings, "admin", ADMIN_PASSWORD)
    async with running(settings) as (app, channel):
        yield Auth(app, settings, channel, key)


async def cli(
    svc: Auth, *args: str, stdin: str = "", key: str | None = None
) -> tuple[int, str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TOKENYARD_")}
    environ["TOKENYARD_AUTH_ADDRESS"] = svc.app.address
    if key is not None:
        environ["TOKENYARD_API_KEY"] = key
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args,
        env=environ, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_admin_cli_manages_roles_users_and_keys(sqlite_svc: Auth) -> None:
    svc, admin = sqlite_svc, sqlite_svc.admin_key
    rc, out, err = await cli(
        svc, "roles", "create", "dev", "--permission", "generate", "--model", "smol-*",
        "--rpm", "60", key=admin,
    )  # fmt: skip
    assert rc == 0, err
    assert "dev" in out and "generate" in out
    rc, out, err = await cli(
        svc, "users", "create", "devon", "--role", "dev", "--password-stdin",
        stdin="devon-password\n", key=admin,
    )  # fmt: skip
    assert rc == 0, err
    user_id = out.splitlines()[1].split()[0]
    rc, out, err = await cli(svc, "keys", "create", "laptop", "--user", user_id, key=admin)
    assert rc == 0, err
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("ty_sk_")
    principal = await svc.app.core.authenticate(secret)
    assert principal.username == "devon" and principal.limits.get("requests_per_minute") == 60
    rc, out, err = await cli(svc, "audit", "--action", "key.create", key=admin)
    assert rc == 0 and out.count("key.create") == 2  # bootstrap key and this one
    assert secret not in out


async def test_admin_cli_errors_are_one_line(sqlite_svc: Auth) -> None:
    rc, _out, err = await cli(sqlite_svc, "users", "get", "not-an-id", key=sqlite_svc.admin_key)
    assert rc == 1 and "INVALID_ARGUMENT" in err and "user_id" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    rc, _out, err = await cli(sqlite_svc, "users", "list")
    assert rc == 2 and "TOKENYARD_API_KEY" in err and "Traceback" not in err
