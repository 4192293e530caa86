"""Several models in one `tokenyard up`: --models, a models file, names and aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.settings import SettingsError, load_settings
from services.router.settings import RouterSettings, parse_model_aliases
from services.stack.launcher import banner, plan, threads_per_worker
from services.stack.models import ServedModel, served_models
from services.stack.settings import StackSettings
from services.stack.state import StateDir


def settings(**flags: str) -> StackSettings:
    return load_settings(StackSettings, {}, flags)


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    folder = StateDir(tmp_path / "state")
    folder.ensure()
    return folder


def workers_of(stack: StackSettings, state: StateDir) -> dict[str, tuple[str, str, str]]:
    """worker name → (port, source, served name) as the launcher would start it."""
    return {
        s.name: (
            s.env["TOKENYARD_INFERENCE_PORT"],
            s.env["TOKENYARD_INFERENCE_MODEL"],
            s.env["TOKENYARD_INFERENCE_SERVED_MODEL_NAME"],
        )
        for s in plan(stack, state, None)
        if s.name.startswith("worker-")
    }


def test_models_flag_starts_workers_for_each_model_on_consecutive_ports(state: StateDir) -> None:
    stack = settings(models="smollm2-135m, tiny=/m/tiny", workers="2", worker_port="7000")
    assert workers_of(stack, state) == {
        "worker-1": ("7000", "smollm2-135m", "smollm2-135m"),
        "worker-2": ("7001", "smollm2-135m", "smollm2-135m"),
        "worker-3": ("7002", "/m/tiny", "tiny"),
        "worker-4": ("7003", "/m/tiny", "tiny"),
    }
    router = next(s for s in plan(stack, state, None) if s.name == "router").env
    assert router["TOKENYARD_ROUTER_WORKERS"] == ",".join(
        f"127.0.0.1:{p}" for p in range(7000, 7004)
    )
    assert "TOKENYARD_ROUTER_MODEL_ALIASES" not in router
    assert threads_per_worker(settings(models="a,b", workers="64")) == 1


def test_a_models_file_gives_each_model_its_workers_and_aliases(
    state: StateDir, tmp_path: Path
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nsource = "smollm2-135m"\nname = "smol"\naliases = ["default", "chat"]\n'
        '[[models]]\nsource = "/m/tiny"\nworkers = 1\n'
    )
    stack = settings(models_file=str(path), workers="2", worker_port="7000")
    assert served_models(stack) == (
        ServedModel("smol", "smollm2-135m", 2, ("default", "chat")),
        ServedModel("/m/tiny", "/m/tiny", 1),  # a missing folder keeps its source as name
    )
    assert [v[2] for v in workers_of(stack, state).values()] == ["smol", "smol", "/m/tiny"]
    router = next(s for s in plan(stack, state, None) if s.name == "router").env
    aliases = router["TOKENYARD_ROUTER_MODEL_ALIASES"]
    assert aliases == "default=smol,chat=smol"
    parsed = load_settings(
        RouterSettings, {"TOKENYARD_ROUTER_MODEL_ALIASES": aliases}, service="router"
    )
    assert dict(parsed.model_aliases) == {"default": "smol", "chat": "smol"}
    text = banner(stack, state, "ty_sk_x", False, None)
    assert "2 worker(s) serving smol (also default, chat), 1 worker(s) serving /m/tiny" in text


def test_one_model_still_works_as_before(state: StateDir) -> None:
    assert workers_of(settings(workers="1"), state) == {
        "worker-1": ("50061", "smollm2-135m", "smollm2-135m")
    }
    one = settings(model="/m/tiny", model_name="tiny", workers="1")
    assert workers_of(one, state)["worker-1"][1:] == ("/m/tiny", "tiny")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"model": "a", "models": "b"}, "--model and --models: give one way"),
        ({"models": "a", "models_file": "/x.toml"}, "--models and --models-file"),
        ({"models": "a", "model_name": "n"}, "--model-name: names the one --model"),
        ({"models": "x=a,x=b"}, "model name 'x' is given twice"),
        ({"models_file": "/no/such/models.toml"}, "--models-file /no/such/models.toml: "),
    ],
)
def test_conflicting_or_repeated_models_are_refused(flags: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        served_models(settings(**flags))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("x = 1", "unknown key 'x'"),
        ("[[models]]\nname = 'a'", "model 1: source: expected a model"),
        ("[[models]]\nsource = 'a'\nworkers = 0", "model 1: workers: expected a whole number"),
        ("[[models]]\nsource = 'a'\naliases = 'b'", "model 1: aliases: expected a list"),
        ("[[models]]\nsource = 'a'\nname = 'a b'", "model 1: name: 'a b' is not a model name"),
        ("[[models]]\nsource = 'a'\ncolour = 1", "model 1: unknown key 'colour'"),
        (
            "[[models]]\nsource = 'a'\naliases = ['b']\n[[models]]\nsource = 'b'",
            "model name 'b' is given twice",
        ),
        ("[[models]\n", "not TOML"),
    ],
)
def test_a_bad_models_file_is_refused_naming_the_file_and_the_model(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(content)
    with pytest.raises(SettingsError, match=message) as caught:
        served_models(settings(models_file=str(path)))
    assert str(path) in str(caught.value)


def test_bad_models_and_aliases_values_name_the_flag() -> None:
    with pytest.raises(SettingsError, match=r"--models .*expected NAME=SOURCE"):
        settings(models="=/m/tiny")
    with pytest.raises(SettingsError, match="not a model name"):
        settings(models="a*=/m/tiny")
    for raw, message in [
        ("a", "expected ALIAS=MODEL"),
        ("a=b,a=c", "given twice"),
        ("a=b,b=c", "both an alias and a model"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_model_aliases(raw)


def test_model_given_twice_is_refused_not_replaced(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["up", "--model", "a"]).model == "a"
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["up", "--model", "a", "--model", "b"])
    assert caught.value.code == 2
    assert "--model names one model; name several with --models A,B" in capsys.readouterr().err
