"""Every command's flags come from its settings class: one flag per setting, and a
flag sets exactly what its variable sets."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from services.auth.admin_cli import AdminClientSettings
from services.auth.settings import AuthSettings
from services.cli import build_parser
from services.common.settings import _show, env_name, flag_name, load_settings, settings_fields
from services.inference.settings import InferenceSettings
from services.router.settings import RouterSettings
from services.stack.settings import ClientSettings, StackSettings

# (argv of the command, its settings class, the service prefix of its variables)
COMMANDS: list[tuple[list[str], type[Any], str]] = [
    (["auth", "serve"], AuthSettings, "auth"),
    (["auth", "migrate"], AuthSettings, "auth"),
    (["auth", "bootstrap"], AuthSettings, "auth"),
    (["router", "serve"], RouterSettings, "router"),
    (["inference", "serve"], InferenceSettings, "inference"),
    (["up"], StackSettings, ""),
    (["generate", "hello"], ClientSettings, ""),
    (["chat"], ClientSettings, ""),
    (["users", "list"], AdminClientSettings, ""),
    (["keys", "list"], AdminClientSettings, ""),
]
# Required settings need a value before anything loads.
REQUIRED = {"TOKENYARD_AUTH_KEY_PEPPER": "pepper-for-tests-0123456789"}


def _options(argv: list[str]) -> dict[str, str]:
    """The command's option strings → their dest."""
    parser = build_parser()
    for word in argv:
        action = next(a for a in parser._subparsers._actions if a.choices)  # type: ignore[union-attr]
        if word not in action.choices:  # type: ignore[operator]
            break
        parser = action.choices[word]  # type: ignore[index]
        if not parser._subparsers:
            break
    return {opt: a.dest for a in parser._actions for opt in a.option_strings}


@pytest.mark.parametrize(("argv", "cls", "service"), COMMANDS, ids=str)
def test_every_setting_has_its_flag_on_the_command(
    argv: list[str], cls: type[Any], service: str
) -> None:
    options = _options(argv)
    for path, f in settings_fields(cls):
        flag = flag_name(f, service)
        if flag is None:
            assert f.metadata["secret"], path  # only secrets go without a flag
            continue
        assert options.get(flag) == path, (flag, path, env_name(f, service))


@pytest.mark.parametrize(("argv", "cls", "service"), COMMANDS, ids=str)
def test_a_flag_sets_what_its_variable_sets(argv: list[str], cls: type[Any], service: str) -> None:
    parser = build_parser()
    checked = 0
    for path, f in settings_fields(cls):
        flag = flag_name(f, service)
        if flag is None or f.default in (None, dataclasses.MISSING):
            continue
        raw = _show(f.default)
        if not raw:
            continue
        via_flag = load_settings(
            cls, REQUIRED, vars(parser.parse_args([*argv, flag, raw])), service=service
        )
        via_env = load_settings(cls, {**REQUIRED, env_name(f, service): raw}, service=service)
        assert via_flag == via_env, (flag, path)
        checked += 1
    assert checked > 0


def test_nested_settings_are_overridden_by_their_own_flag_only() -> None:
    """`--port` and `--internal-tls-cert` are two settings, never matched by bare name."""
    args = vars(build_parser().parse_args(["router", "serve", "--port", "6001"]))
    settings = load_settings(RouterSettings, {}, args, service="router")
    assert settings.server.port == 6001
    args = vars(build_parser().parse_args(["inference", "serve", "--kv-cache-mib", "100"]))
    assert load_settings(InferenceSettings, {}, args, service="inference").kv_cache_mib == 100
    assert load_settings(RouterSettings, {}, {"port": "7000"}, service="router").server.port == (
        RouterSettings().server.port
    )
