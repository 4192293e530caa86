"""`tokenyard compose-secrets` fills .env's empty secrets: strong, random, 0600, idempotent."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import main
from services.stack.secrets_env import SECRET_NAMES, fill_env_file
from services.stack.secrets_env import main as module_main
from tests.unit.stack.compose_file import ROOT, load_compose, read_env_file


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """A copy of the shipped .env, world-readable as a fresh checkout leaves it."""
    path = tmp_path / ".env"
    path.write_text((ROOT / ".env").read_text())
    path.chmod(0o644)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_it_fills_every_empty_secret_with_32_random_bytes_and_keeps_the_rest(
    env_file: Path,
) -> None:
    before = env_file.read_text().splitlines()
    outcome = fill_env_file(env_file)
    assert outcome.filled == list(SECRET_NAMES) and not outcome.weak
    after = env_file.read_text().splitlines()
    assert len(after) == len(before)
    changed = {b.split("=")[0] for b, a in zip(before, after, strict=True) if a != b}
    assert changed == set(SECRET_NAMES)
    values = read_env_file(env_file)
    secrets = [values[name] for name in SECRET_NAMES]
    for value in secrets:
        assert len(base64.urlsafe_b64decode(value + "=")) == 32
    assert len(set(secrets)) == len(secrets)
    assert mode(env_file) == 0o600
    # What it wrote is what compose needs: it starts, and the services get those values.
    services = load_compose("docker-compose.yml", env=values)["services"]
    assert (
        services["auth"]["environment"]["TOKENYARD_SERVICE_TOKEN"]
        == values["TOKENYARD_SERVICE_TOKEN"]
    )


def test_a_second_run_changes_nothing_and_two_files_never_share_a_value(
    env_file: Path, tmp_path: Path
) -> None:
    fill_env_file(env_file)
    first = env_file.read_text()
    again = fill_env_file(env_file)
    assert env_file.read_text() == first
    assert again.filled == [] and again.kept == list(SECRET_NAMES)
    other = tmp_path / "other.env"
    other.write_text((ROOT / ".env").read_text())
    fill_env_file(other)
    mine, theirs = read_env_file(env_file), read_env_file(other)
    assert all(mine[name] != theirs[name] for name in SECRET_NAMES)


def test_a_secret_already_set_is_kept_and_a_missing_one_appended(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    kept = 'POSTGRES_USER=me\nPOSTGRES_PASSWORD="mine-and-long-enough-0123456789abcd"\n'
    path.write_text(kept)
    outcome = fill_env_file(path)
    assert outcome.kept == ["POSTGRES_PASSWORD"] and not outcome.weak
    assert sorted(outcome.filled) == sorted(set(SECRET_NAMES) - {"POSTGRES_PASSWORD"})
    assert path.read_text().startswith(kept)
    assert all(len(read_env_file(path)[name]) >= 43 for name in outcome.filled)


def test_a_missing_file_is_created_0600_even_under_a_lax_umask(tmp_path: Path) -> None:
    path = tmp_path / "new.env"
    old = os.umask(0)
    try:
        fill_env_file(path)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert set(read_env_file(path)) == set(SECRET_NAMES)


def test_the_command_prints_names_never_values_and_flags_weak_secrets(
    env_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compose-secrets", "--env-file", str(env_file)]) == 0
    out, err = capsys.readouterr()
    values = read_env_file(env_file)
    assert all(name in out for name in SECRET_NAMES)
    assert not any(values[name] in out + err for name in SECRET_NAMES)
    # A value this repository once shipped is public: kept (never clobbered), but reported.
    text = env_file.read_text().replace(
        f"POSTGRES_PASSWORD={values['POSTGRES_PASSWORD']}", "POSTGRES_PASSWORD=tokenyard-dev-only"
    )
    env_file.write_text(text)
    assert module_main(["--env-file", str(env_file)]) == 1
    out, err = capsys.readouterr()
    assert "POSTGRES_PASSWORD" in err and "tokenyard-dev-only" not in out + err
    assert read_env_file(env_file)["POSTGRES_PASSWORD"] == "tokenyard-dev-only"


def test_it_runs_from_a_bare_clone_with_the_standard_library_only(env_file: Path) -> None:
    """`python3 -m services.stack.secrets_env` needs no installed package (-S: no site)."""
    done = subprocess.run(
        [sys.executable, "-S", "-m", "services.stack.secrets_env", "--env-file", str(env_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ.get("PATH", "")},
    )
    assert done.returncode == 0, done.stderr
    values = read_env_file(env_file)
    assert all(len(values[name]) >= 43 for name in SECRET_NAMES)
    assert not any(values[name] in done.stdout + done.stderr for name in SECRET_NAMES)
