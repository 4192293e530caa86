"""Worker settings from environment and flags, and the serve command's parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import build_parser, main
from services.common.settings import SettingsError
from services.inference.settings import DEFAULT_PORT, load_inference_settings


def parse(*argv: str) -> dict[str, object]:
    return vars(build_parser().parse_args(["inference", "serve", *argv]))


def test_defaults() -> None:
    settings = load_inference_settings({}, parse())
    assert settings.server.port == DEFAULT_PORT == 50061
    assert settings.model == "smollm2-135m"
    assert settings.served_model_name is None
    assert (settings.device, settings.dtype) == ("auto", "auto")
    assert settings.prefix_cache is True
    assert settings.cache_dir.expanduser() == Path.home() / ".cache/tokenyard/models"
    assert settings.internal.service_token is None


def test_environment_and_flags_flags_win(tmp_path: Path) -> None:
    env = {
        "TOKENYARD_INFERENCE_MODEL": "/models/a",
        "TOKENYARD_INFERENCE_PORT": "6000",
        "TOKENYARD_INFERENCE_MAX_RUNNING": "3",
        "TOKENYARD_INFERENCE_PREFIX_CACHE": "off",
        "TOKENYARD_INFERENCE_CACHE_DIR": str(tmp_path),
        "TOKENYARD_SERVICE_TOKEN": "tok-123",
    }
    settings = load_inference_settings(
        env,
        parse(
            "--model",
            "/models/b",
            "--port",
            "7000",
            "--served-model-name",
            "b",
            "--device",
            "CUDA:1",
        ),
    )
    assert settings.model == "/models/b"
    assert settings.server.port == 7000
    assert settings.served_model_name == "b"
    assert settings.device == "cuda:1"
    assert settings.max_running == 3
    assert settings.prefix_cache is False
    assert settings.cache_dir == tmp_path
    assert settings.internal.service_token == "tok-123"
    assert "tok-123" not in repr(settings)


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (("--device", "gpu"), {}, "--device (TOKENYARD_INFERENCE_DEVICE)"),
        (("--dtype", "int4"), {}, "--dtype"),
        (("--port", "70000"), {}, "--port"),
        ((), {"TOKENYARD_INFERENCE_MAX_QUEUED": "0"}, "TOKENYARD_INFERENCE_MAX_QUEUED"),
    ],
)
def test_bad_settings_name_the_variable(
    argv: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_inference_settings(env, parse(*argv))
    assert named in str(caught.value)


def test_serve_with_a_bad_flag_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inference", "serve", "--dtype", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("tokenyard: configuration error: --dtype")
