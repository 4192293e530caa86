"""Secure by default: internal services exposed beyond loopback need a strong token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.auth.settings import load_auth_settings
from services.common.settings import SettingsError
from services.inference.settings import load_inference_settings
from tests.conftest import free_port

PEPPER = {"TOKENYARD_AUTH_KEY_PEPPER": "pepper-for-tests-0123456789"}
STRONG = "s" * 32
WEAK = "w" * 31


def auth_env(host: str, token: str | None) -> dict[str, str]:
    env = {**PEPPER, "TOKENYARD_AUTH_HOST": host}
    if token is not None:
        env["TOKENYARD_SERVICE_TOKEN"] = token
    return env


def inference_env(host: str, token: str | None) -> dict[str, str]:
    env = {"TOKENYARD_INFERENCE_HOST": host}
    if token is not None:
        env["TOKENYARD_SERVICE_TOKEN"] = token
    return env


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "auth.internal"])
@pytest.mark.parametrize("token", [None, "", WEAK])
def test_exposed_auth_and_worker_without_a_strong_token_refuse_to_load(
    host: str, token: str | None
) -> None:
    """Attack: an auth service or worker bound to 0.0.0.0 with no service token (or a
    guessable short one) took internal calls (Authenticate, RecordUsage, Generate)
    from anyone on the network."""
    with pytest.raises(SettingsError, match="TOKENYARD_SERVICE_TOKEN") as auth_err:
        load_auth_settings(auth_env(host, token))
    with pytest.raises(SettingsError, match="TOKENYARD_SERVICE_TOKEN") as worker_err:
        load_inference_settings(inference_env(host, token))
    for err in (auth_err, worker_err):
        assert "\n" not in str(err.value) and host in str(err.value)
        assert WEAK not in str(err.value)


@pytest.mark.parametrize(
    ("host", "token"), [("127.0.0.1", None), ("::1", None), ("0.0.0.0", STRONG)]
)
def test_loopback_or_a_strong_token_loads(host: str, token: str | None) -> None:
    """Local use stays token-free; an exposed service with a 32-byte token starts."""
    assert load_auth_settings(auth_env(host, token)).server.host == host
    assert load_inference_settings(inference_env(host, token)).server.host == host


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`tokenyard ARGS` in a fresh process (killed if it is still running after 60 s)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("TOKENYARD_")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env={**full, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("service", ["auth", "inference"])
def test_cli_refuses_to_start_exposed_without_a_token(service: str, tmp_path: Path) -> None:
    """Attack: `tokenyard auth|inference serve` on 0.0.0.0 without a token started; it
    must exit 2 with one line naming the variable, before touching a database or model."""
    port = str(free_port())
    if service == "auth":
        env = auth_env("0.0.0.0", WEAK)
        args = ["auth", "serve", "--port", port, "--database-url", f"sqlite:///{tmp_path}/a.db"]
    else:
        env = inference_env("0.0.0.0", None)
        args = ["inference", "serve", "--port", port, "--model", str(tmp_path / "missing")]
    repo = Path(__file__).resolve().parents[2]
    done = run_cli(args, env, repo)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "TOKENYARD_SERVICE_TOKEN" in lines[0]
    assert not (tmp_path / "a.db").exists()
