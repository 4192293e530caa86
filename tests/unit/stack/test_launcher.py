"""What `tokenyard up` would start: commands, environments and addresses agree."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from services.auth.settings import AuthSettings
from services.cli import build_parser
from services.common.settings import SettingsError, known_variables, load_settings
from services.inference.settings import InferenceSettings
from services.router.settings import RouterSettings
from services.stack.launcher import (
    Tls,
    banner,
    plan,
    refuse_overridden,
    served_model_name,
    threads_per_worker,
)
from services.stack.settings import StackSettings
from services.stack.state import StateDir

KNOWN: dict[str, tuple[type[Any], str]] = {
    "auth": (AuthSettings, "auth"),
    "router": (RouterSettings, "router"),
    "inference": (InferenceSettings, "inference"),
}


def settings(**flags: str) -> StackSettings:
    return load_settings(StackSettings, {}, flags)


def test_children_run_real_commands_with_variables_their_settings_read(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    specs = plan(settings(workers="3", metrics_port="9100"), state, None)
    assert [s.name for s in specs] == ["auth", "worker-1", "worker-2", "worker-3", "router"]
    parser = build_parser()
    for spec in specs:
        argv = list(spec.argv)
        kind = parser.parse_args(argv[argv.index("services.cli") + 1 :]).command
        cls, svc = KNOWN[kind]
        known = {n for n, _, _ in known_variables(cls, svc)}
        ours = {k for k in spec.env if k.startswith("TOKENYARD_") and k not in os.environ}
        assert ours <= known, (spec.name, sorted(ours - known))


def test_the_router_is_told_where_auth_and_every_worker_listen(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    specs = {s.name: s for s in plan(settings(workers="2", worker_port="6000"), state, None)}
    router = specs["router"].env
    assert router["TOKENYARD_ROUTER_AUTH_ADDRESS"] == specs["auth"].health_target
    assert router["TOKENYARD_ROUTER_WORKERS"] == "127.0.0.1:6000,127.0.0.1:6001"
    assert [specs[f"worker-{i}"].health_target for i in (1, 2)] == [
        "127.0.0.1:6000",
        "127.0.0.1:6001",
    ]
    assert specs["router"].health_target == "127.0.0.1:50051"
    token = router["TOKENYARD_SERVICE_TOKEN"]
    assert all(s.env["TOKENYARD_SERVICE_TOKEN"] == token for s in specs.values())
    assert stat.S_IMODE((state.root / "service-token").stat().st_mode) == 0o600
    assert specs["auth"].env["TOKENYARD_AUTH_KEY_PEPPER_FILE"] == str(state.root / "key-pepper")
    assert all(token not in " ".join(s.argv) for s in specs.values())


def test_start_and_stop_order_drains_the_router_first(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    state.ensure()
    specs = {s.name: s for s in plan(settings(workers="1"), state, None)}
    assert specs["router"].start_order > specs["worker-1"].start_order == specs["auth"].start_order
    assert specs["router"].stop_order < specs["worker-1"].stop_order < specs["auth"].stop_order


def test_tls_points_every_service_at_existing_certificates(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    state.ensure()
    folder = tmp_path / "tls"
    folder.mkdir()
    for name in ("ca.pem", "router.pem", "router.key", "auth.pem", "auth.key"):
        (folder / name).write_text("x")
    (folder / "worker.pem").write_text("x")
    (folder / "worker.key").write_text("x")
    specs = {s.name: s for s in plan(settings(workers="1"), state, Tls(folder))}
    assert specs["worker-1"].env["TOKENYARD_INFERENCE_TLS_CLIENT_CA"] == str(folder / "ca.pem")
    assert specs["auth"].env["TOKENYARD_AUTH_TLS_CLIENT_CA"] == str(folder / "ca.pem")
    assert "TOKENYARD_ROUTER_TLS_CLIENT_CA" not in specs["router"].env  # public: any client
    assert specs["router"].env["TOKENYARD_INTERNAL_TLS_CERT"] == str(folder / "router.pem")
    for spec in specs.values():
        for key, value in spec.env.items():
            if "_TLS_" in key and key.startswith("TOKENYARD_"):
                assert Path(value).is_file(), key


def test_worker_threads_share_the_cores_and_model_names_follow_the_model(
    tmp_path: Path,
) -> None:
    cores = os.cpu_count() or 1
    assert threads_per_worker(settings(workers="2")) == max(1, cores // 2)
    assert threads_per_worker(settings(workers="64")) == 1
    assert threads_per_worker(settings(workers="2", threads="3")) == 3
    assert served_model_name(settings()) == "smollm2-135m"
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert served_model_name(settings(model=str(model_dir))) == "my-model"
    assert served_model_name(settings(model="/x/y/model.Q4.gguf")) == "model.Q4"
    assert served_model_name(settings(model_name="prod")) == "prod"


def test_the_banner_shows_the_key_only_when_it_was_just_created(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    first = banner(settings(port="6001"), state, "ty_sk_secret", True, None)
    later = banner(settings(), state, "ty_sk_secret", False, None)
    assert "ty_sk_secret" in first and "--address 127.0.0.1:6001" in first
    assert "ty_sk_secret" not in later and "demo-key" in later
    assert 'tokenyard generate --model smollm2-135m "' in later


def test_the_router_serves_openai_http_on_8000_and_the_banner_says_how_to_use_it(
    tmp_path: Path,
) -> None:
    state = StateDir(tmp_path / "s")
    state.ensure()
    router = {s.name: s for s in plan(settings(), state, None)}["router"]
    assert router.env["TOKENYARD_ROUTER_HTTP_ADDRESS"] == "127.0.0.1:8000"
    other = {s.name: s for s in plan(settings(http_port="8123", host="::"), state, None)}
    assert other["router"].env["TOKENYARD_ROUTER_HTTP_ADDRESS"] == "[::]:8123"
    text = banner(settings(), state, "ty_sk_secret", True, None)
    assert "export OPENAI_BASE_URL=http://127.0.0.1:8000/v1" in text
    assert f"export OPENAI_API_KEY=$(cat {state.path('demo-key')})" in text


def test_bad_flags_name_the_flag() -> None:
    with pytest.raises(SettingsError, match="--workers"):
        settings(workers="0")
    with pytest.raises(SettingsError, match="--port"):
        settings(port="http")


def test_database_and_redis_urls_reach_auth_and_the_router(tmp_path: Path) -> None:
    """`up --database-url/--redis-url` (or their variables) are honoured, not replaced."""
    state = StateDir(tmp_path / "state")
    state.ensure()
    pg = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    flags = settings(database_url=pg, redis_url="redis://127.0.0.1:6379/0")
    specs = {s.name: s for s in plan(flags, state, None)}
    assert specs["auth"].env["TOKENYARD_AUTH_DATABASE_URL"] == pg
    assert specs["router"].env["TOKENYARD_REDIS_URL"] == "redis://127.0.0.1:6379/0"
    default = {s.name: s for s in plan(settings(), state, None)}
    assert default["auth"].env["TOKENYARD_AUTH_DATABASE_URL"] == state.database_url
    assert "TOKENYARD_REDIS_URL" not in default["router"].env
    from_env = load_settings(StackSettings, {"TOKENYARD_AUTH_DATABASE_URL": pg})
    assert from_env.database_url == pg


@pytest.mark.parametrize(
    "name", ["TOKENYARD_AUTH_PORT", "TOKENYARD_INFERENCE_MODEL", "TOKENYARD_ROUTER_WORKERS"]
)
def test_a_variable_the_stack_would_replace_is_refused_with_one_line(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    monkeypatch.setenv("TOKENYARD_INFERENCE_MAX_RUNNING", "3")  # passed on as is: fine
    refuse_overridden(os.environ, plan(settings(), state, None))
    monkeypatch.setenv(name, "something-else")
    with pytest.raises(SettingsError) as caught:
        refuse_overridden(os.environ, plan(settings(), state, None))
    assert str(caught.value).startswith(f"{name}: `tokenyard up` sets this itself")
    assert "\n" not in str(caught.value)


def test_quantize_reaches_every_worker(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    specs = plan(settings(workers="2", quantize="int4"), state, None)
    workers = [s for s in specs if s.name.startswith("worker-")]
    assert [s.env["TOKENYARD_INFERENCE_QUANTIZE"] for s in workers] == ["int4", "int4"]
    assert plan(settings(), state, None)[1].env["TOKENYARD_INFERENCE_QUANTIZE"] == "none"
    with pytest.raises(SettingsError, match="--quantize"):
        settings(quantize="int2")
