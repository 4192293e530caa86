"""Settings: typed values from the environment and flags, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from services.common.config import ServerSettings
from services.common.settings import (
    SettingsError,
    known_variables,
    load_settings,
    parse_choice,
    parse_url,
    setting,
)


@dataclass(frozen=True, kw_only=True)
class Example:
    server: ServerSettings
    policy: str = setting(
        "TOKENYARD_{service}_POLICY", parse_choice("least_load", "round_robin"), "least_load"
    )
    database_url: str = setting("TOKENYARD_{service}_DATABASE_URL", parse_url("sqlite", "postgres"))


def test_values_come_from_environment_and_flags_win() -> None:
    env = {"TOKENYARD_X_PORT": "5000", "TOKENYARD_X_DATABASE_URL": "sqlite:///a.db"}
    loaded = load_settings(Example, env, service="x")
    assert loaded.server.port == 5000
    assert loaded.policy == "least_load"
    flagged = load_settings(Example, env, {"server.port": "6000", "policy": None}, service="x")
    assert flagged.server.port == 6000


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOKENYARD_X_PORT": "abc"}, "--port (TOKENYARD_X_PORT): expected a port number"),
        ({"TOKENYARD_X_PORT": "70000"}, "TOKENYARD_X_PORT"),
        (
            {"TOKENYARD_X_POLICY": "fastest"},
            "--policy (TOKENYARD_X_POLICY): expected one of least_load",
        ),
        (
            {"TOKENYARD_X_GRACE_PERIOD": "-1"},
            "--grace-period (TOKENYARD_X_GRACE_PERIOD): expected a number",
        ),
        (
            {"TOKENYARD_X_REFLECTION": "maybe"},
            "--reflection (TOKENYARD_X_REFLECTION): expected true or false",
        ),
        (
            {"TOKENYARD_X_DATABASE_URL": ""},
            "--database-url (TOKENYARD_X_DATABASE_URL): required but not set",
        ),
        (
            {"TOKENYARD_X_DATABASE_URL": "mysql://h/db"},
            "--database-url (TOKENYARD_X_DATABASE_URL): expected a URL",
        ),
        (
            {"TOKENYARD_X_TLS_CERT": "/nonexistent.pem"},
            "--tls-cert (TOKENYARD_X_TLS_CERT): no such file",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    base = {"TOKENYARD_X_DATABASE_URL": "sqlite:///a.db"}
    with pytest.raises(SettingsError) as caught:
        load_settings(Example, {**base, **env}, service="x")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_known_variables_lists_every_field() -> None:
    names = [name for name, _, _ in known_variables(Example, "x")]
    assert "TOKENYARD_X_PORT" in names
    assert "TOKENYARD_X_DATABASE_URL" in names
    assert "TOKENYARD_X_POLICY" in names


def test_health_command_reports_unreachable_server() -> None:
    """`tokenyard health` exits 1 and says why when nothing listens."""
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "health", "127.0.0.1:1", "--timeout", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "UNAVAILABLE" in proc.stdout
