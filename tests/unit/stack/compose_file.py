"""Read docker-compose files the way `docker compose config` would (enough for tests).

Variables are interpolated from `.env` (`${X}`, `${X:-default}`, `${X:?error}`,
`$$`), `!reset` tags are understood, and list-form environments become dicts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that knows compose's `!reset` tag."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    return None


_Loader.add_constructor("!reset", _reset)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments and blanks skipped)."""
    return parse_env(path.read_text())


def filled_env() -> dict[str, str]:
    """The shipped .env with its empty secrets filled, as the generator would."""
    from services.stack.secrets_env import fill_text

    text, _ = fill_text((ROOT / ".env").read_text())
    return parse_env(text)


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines of .env text (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Substitute variables in every string of `value`; unset required ones raise."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, op, arg = m.group(1), m.group(2), m.group(3)
            if op == "?" and not env.get(name):
                raise KeyError(f"{name}: {arg}")
            if op == "-" and not env.get(name):
                return arg
            return env.get(name, "")

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def load_compose(*names: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The merged, interpolated compose model of `names` (later files override).

    `env` defaults to the shipped .env with its (empty) secrets filled.
    """
    env = filled_env() if env is None else env
    merged: dict[str, Any] = {}
    for name in names:
        doc = yaml.load((ROOT / name).read_text(), Loader=_Loader)
        _merge(merged, doc)
    model: dict[str, Any] = interpolate(merged, env)
    for svc in model["services"].values():
        environ = svc.get("environment") or {}
        if isinstance(environ, list):
            environ = dict(item.split("=", 1) for item in environ)
        svc["environment"] = {k: "" if v is None else str(v) for k, v in environ.items()}
    return model


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if value is None:  # !reset
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
