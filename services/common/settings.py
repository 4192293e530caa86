"""Typed settings from `TOKENYARD_*` environment variables and CLI flags.

Each service declares one frozen dataclass whose fields carry their variable name
(`setting(...)`). The entry point calls `load_settings` once with the environment
and the parsed flags and passes the object down; nothing reads the environment at
import time. A bad value stops the service with one line naming the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def setting(
    env: str,
    parse: Callable[[str], Any] = str,
    default: Any = _MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    secret: bool = False,
) -> Any:
    """Declare a dataclass field read from `env` (which may hold `{service}`).

    `default=_MISSING` makes the variable required. `flag` is the CLI flag that
    overrides it (named in errors); `secret` keeps its value out of repr and docs.
    """
    meta = {"env": env, "parse": parse, "help": help, "flag": flag, "secret": secret}
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple or frozenset for collection defaults")
    return dataclasses.field(default=default, metadata=meta, repr=not secret)


def env_name(f: dataclasses.Field[Any], service: str) -> str:
    """The environment variable a field reads, for one service prefix."""
    return str(f.metadata["env"]).format(service=service.upper())


def flag_name(f: dataclasses.Field[Any], service: str = "") -> str | None:
    """The CLI flag of a field: its declared `flag`, else derived from its variable
    (`TOKENYARD_INFERENCE_MAX_RUNNING` → `--max-running` for the inference service).
    Secrets have a flag only where one is declared: a flag shows in `ps`."""
    if f.metadata["flag"]:
        return str(f.metadata["flag"])
    if f.metadata["secret"]:
        return None
    env = env_name(f, service).removeprefix("TOKENYARD_")
    if service:
        env = env.removeprefix(service.upper() + "_")
    return "--" + env.lower().replace("_", "-")


def settings_fields(
    cls: type[Any], prefix: str = ""
) -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Every setting of `cls` with its dotted path (`server.port`), nested ones included."""
    for f in dataclasses.fields(cls):
        if "env" in f.metadata:
            yield prefix + f.name, f
        else:
            yield from settings_fields(_resolve(cls, f.name), f"{prefix}{f.name}.")


def add_flags(parser: argparse.ArgumentParser, cls: type[Any], service: str = "") -> None:
    """Add one flag per setting of `cls` to `parser` (dest: the setting's dotted path).

    Flags come only from here, so a setting without a flag cannot exist; pass the
    parsed namespace's `vars()` to `load_settings` as overrides. A boolean flag
    alone means true (`--tls`); it also takes a value (`--prefix-cache false`).
    """
    for path, f in settings_fields(cls):
        flag = flag_name(f, service)
        if flag is None:
            continue
        help_text = f"{f.metadata['help']} [{env_name(f, service)}]".replace("%", "%%")
        extra: dict[str, Any] = {"metavar": f.name.upper()}
        if f.metadata["parse"] is parse_bool:
            extra = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        parser.add_argument(flag, dest=path, default=None, help=help_text, **extra)


def load_settings(
    cls: type[T],
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
    *,
    service: str = "",
) -> T:
    """Build `cls` from `environ`, with non-None `overrides` (CLI flags) winning.

    Overrides are keyed by the setting's dotted path (`server.port`), as
    `add_flags` names them. Nested settings dataclasses (fields without an env
    name) load recursively with the same environment and service prefix.
    """
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if "env" not in f.metadata:
            sub = f.type if isinstance(f.type, type) else _resolve(cls, f.name)
            head = f.name + "."
            nested = {k.removeprefix(head): v for k, v in overrides.items() if k.startswith(head)}
            values[f.name] = load_settings(sub, environ, nested, service=service)
            continue
        name = env_name(f, service)
        flag = flag_name(f, service)
        label = name if flag is None else f"{flag} ({name})"
        raw: Any
        if overrides.get(f.name) is not None:
            raw = overrides[f.name]
        elif environ.get(name, "") != "":
            raw = environ[name]
        elif f.default is not _MISSING:
            values[f.name] = f.default
            continue
        else:
            raise SettingsError(f"{label}: required but not set")
        if not isinstance(raw, str):
            values[f.name] = raw
            continue
        try:
            values[f.name] = f.metadata["parse"](raw.strip())
        except (ValueError, TypeError) as exc:
            shown = "<hidden>" if f.metadata["secret"] else repr(raw)
            raise SettingsError(f"{label}: {exc} (got {shown})") from None
    return cls(**values)


def _resolve(cls: type[Any], name: str) -> type[Any]:
    import typing

    hints = typing.get_type_hints(cls)
    return hints[name]  # type: ignore[no-any-return]


def known_variables(cls: type[Any], service: str = "") -> list[tuple[str, str, str]]:
    """Every variable `cls` reads, as (name, default shown, help), recursively."""
    out: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cls):
        if "env" not in f.metadata:
            out.extend(known_variables(_resolve(cls, f.name), service))
            continue
        if f.default is _MISSING:
            shown = "(required)"
        elif f.metadata["secret"]:
            shown = "(secret)"
        else:
            shown = "" if f.default is None else _show(f.default)
        out.append((env_name(f, service), shown, str(f.metadata["help"])))
    return out


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | frozenset):
        return ",".join(str(v) for v in value)
    return str(value)


# Parsers: each takes the raw string and returns the value or raises ValueError
# with a short reason (the variable name is added by load_settings).


def parse_port(raw: str) -> int:
    """A TCP port, 0 (pick a free one) to 65535."""
    if not raw.isdigit():
        raise ValueError("expected a port number 0-65535")
    port = int(raw)
    if port > 65535:
        raise ValueError("expected a port number 0-65535")
    return port


def parse_bool(raw: str) -> bool:
    """true/false, 1/0, yes/no, on/off."""
    low = raw.lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def parse_positive_float(raw: str) -> float:
    """A finite number > 0 (seconds, ratios)."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a number greater than 0")
    return value


def parse_non_negative_float(raw: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a number of at least 0")
    return value


def parse_positive_int(raw: str) -> int:
    """An integer >= 1."""
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError("expected a whole number of at least 1")
    return int(raw)


def parse_non_negative_int(raw: str) -> int:
    """An integer >= 0."""
    if not raw.isdigit():
        raise ValueError("expected a whole number of at least 0")
    return int(raw)


def parse_choice(*choices: str) -> Callable[[str], str]:
    """One of `choices` (case-insensitive)."""

    def parse(raw: str) -> str:
        low = raw.lower()
        if low not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return low

    return parse


def parse_list(raw: str) -> tuple[str, ...]:
    """Comma-separated values, blanks dropped."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def parse_address(raw: str) -> str:
    """host:port (IPv6 in brackets), or a dns:/// or unix: target."""
    if raw.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
        return raw
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError("expected host:port")
    return raw


def parse_url(*schemes: str) -> Callable[[str], str]:
    """A URL whose scheme starts with one of `schemes`."""

    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if not parts.scheme or not any(parts.scheme.startswith(s) for s in schemes):
            raise ValueError(f"expected a URL starting with {' or '.join(schemes)}")
        return raw

    return parse


def parse_path(raw: str) -> Path:
    """A filesystem path (~ expanded)."""
    return Path(raw).expanduser()


def parse_existing_file(raw: str) -> Path:
    """A path to a file that exists."""
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ValueError("no such file")
    return path


def all_variables(specs: Iterable[tuple[type[Any], str]]) -> set[str]:
    """Every variable name read by the given (settings class, service) pairs."""
    return {name for cls, svc in specs for name, _, _ in known_variables(cls, svc)}
