"""The models one `tokenyard up` serves: from --model, --models or a models file.

Each model has one name (what clients put in requests, what usage rows and
roles carry), a source (the demo model, a folder, a GGUF file or a hub id), a
number of workers and optional aliases, names the router resolves to the model's
name before it authorizes, limits, routes or records anything.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.settings import SettingsError, parse_list

if TYPE_CHECKING:
    from services.stack.settings import StackSettings

DEMO_MODEL = "smollm2-135m"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")


@dataclass(frozen=True)
class ServedModel:
    """One model of the stack: its name, source, workers and aliases."""

    name: str
    source: str
    workers: int
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelEntry:
    """One `[NAME=]SOURCE` entry of --models (its workers come from --workers)."""

    source: str
    name: str | None = None


def name_from_source(source: str) -> str:
    """The name a model gets when none is given: the demo's, a GGUF file's stem,
    a folder's name, else the source itself (a hub id)."""
    if source == DEMO_MODEL:
        return DEMO_MODEL
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.exists() else source


def parse_models(raw: str) -> tuple[ModelEntry, ...]:
    """Comma-separated `[NAME=]SOURCE` entries, e.g. `smollm2-135m,tiny=/models/tiny`."""
    entries: list[ModelEntry] = []
    for part in parse_list(raw):
        name, sep, source = part.partition("=")
        if not sep:
            entries.append(ModelEntry(part))
            continue
        if not name.strip() or not source.strip():
            raise ValueError(f"expected NAME=SOURCE, got {part!r}")
        entries.append(ModelEntry(source.strip(), _checked_name(name.strip())))
    if not entries:
        raise ValueError("expected at least one model")
    return tuple(entries)


def read_models_file(path: Path, default_workers: int) -> tuple[ServedModel, ...]:
    """Models from a TOML file: one `[[models]]` table each, with `source` and
    optional `name`, `workers` and `aliases`. Errors name the file and the entry."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(f"--models-file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"--models-file {path}: not TOML: {exc}") from None
    tables = data.get("models")
    extra = sorted(set(data) - {"models"})
    if extra:
        raise SettingsError(f"--models-file {path}: unknown key {extra[0]!r} (expected [[models]])")
    if not isinstance(tables, list) or not tables:
        raise SettingsError(f"--models-file {path}: expected at least one [[models]] table")
    models: list[ServedModel] = []
    for number, table in enumerate(tables, start=1):
        try:
            models.append(_model_of(table, default_workers))
        except ValueError as exc:
            raise SettingsError(f"--models-file {path}: model {number}: {exc}") from None
    return tuple(models)


def _model_of(table: dict[str, Any], default_workers: int) -> ServedModel:
    unknown = sorted(set(table) - {"name", "source", "workers", "aliases"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (expected name, source, workers, aliases)")
    source = table.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError("source: expected a model (smollm2-135m, a folder, a GGUF file, a hub id)")
    name = table.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError("name: expected a string")
    workers = table.get("workers", default_workers)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError("workers: expected a whole number of at least 1")
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ValueError("aliases: expected a list of names")
    return ServedModel(
        name_from_source(source.strip()) if name is None else _checked_name(name, "name"),
        source.strip(),
        workers,
        tuple(_checked_name(a, "aliases") for a in aliases),
    )


def _checked_name(name: str, field: str = "name") -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{field}: {name!r} is not a model name (letters, digits, ._:/@+-)")
    return name


def served_models(settings: StackSettings) -> tuple[ServedModel, ...]:
    """The stack's models: --models-file, --models, or --model (the demo by default).

    Only one of the three may be given; names and aliases must not repeat.
    """
    given = [
        flag
        for flag, value in (
            ("--model", settings.model),
            ("--models", settings.models),
            ("--models-file", settings.models_file),
        )
        if value
    ]
    if len(given) > 1:
        raise SettingsError(f"{given[0]} and {given[1]}: give one way of naming the models")
    if settings.model_name and given and given[0] != "--model":
        raise SettingsError("--model-name: names the one --model; name models in --models")
    if settings.models_file is not None:
        models = read_models_file(settings.models_file, settings.workers)
    elif settings.models:
        models = tuple(
            ServedModel(e.name or name_from_source(e.source), e.source, settings.workers)
            for e in settings.models
        )
    else:
        source = settings.model or DEMO_MODEL
        name = settings.model_name or name_from_source(source)
        models = (ServedModel(name, source, settings.workers),)
    seen: set[str] = set()
    for model in models:
        for name in (model.name, *model.aliases):
            if name in seen:
                where = given[0] if given else "--model"
                if settings.models_file is not None:
                    where = f"--models-file {settings.models_file}"
                raise SettingsError(f"{where}: model name {name!r} is given twice")
            seen.add(name)
    return models


def alias_map(models: tuple[ServedModel, ...]) -> str:
    """The router's TOKENYARD_ROUTER_MODEL_ALIASES value: `alias=name,…`."""
    return ",".join(f"{alias}={m.name}" for m in models for alias in m.aliases)
