"""Settings of `tokenyard up`, the whole stack on one machine (flags override them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.auth.settings import parse_database_url
from services.common.settings import (
    parse_address,
    parse_bool,
    parse_choice,
    parse_non_negative_int,
    parse_path,
    parse_port,
    parse_positive_float,
    parse_positive_int,
    setting,
)
from services.inference.settings import QUANTIZATIONS
from services.router.settings import parse_redis_url
from services.stack.models import DEMO_MODEL, ModelEntry, parse_models
from services.stack.state import state_dir_setting

__all__ = ["DEMO_MODEL", "ClientSettings", "StackSettings"]


@dataclass(frozen=True, kw_only=True)
class StackSettings:
    """Where state lives, how many workers on which models, ports, restarts, TLS."""

    state_dir: Path = state_dir_setting()
    workers: int = setting(
        "TOKENYARD_UP_WORKERS",
        parse_positive_int,
        default=2,
        flag="--workers",
        help="Inference workers to start per model (a models file may say otherwise).",
    )
    model: str | None = setting(
        "TOKENYARD_UP_MODEL",
        default=None,
        flag="--model",
        help="The one model the workers serve: smollm2-135m (the default), a model folder, "
        "a GGUF file or a hub id.",
    )
    model_name: str | None = setting(
        "TOKENYARD_UP_MODEL_NAME",
        default=None,
        flag="--model-name",
        help="Name clients use for the model (default: derived from --model).",
    )
    models: tuple[ModelEntry, ...] = setting(
        "TOKENYARD_UP_MODELS",
        parse_models,
        default=(),
        flag="--models",
        help="Several models instead of --model: comma-separated [NAME=]SOURCE entries, "
        "--workers workers each (e.g. smollm2-135m,tiny=/models/tiny).",
    )
    models_file: Path | None = setting(
        "TOKENYARD_UP_MODELS_FILE",
        parse_path,
        default=None,
        flag="--models-file",
        help="TOML file of models instead of --model: one [[models]] table each with source "
        "and optional name, workers and aliases (docs/local-stack.md).",
    )
    quantize: str = setting(
        "TOKENYARD_UP_QUANTIZE",
        parse_choice(*QUANTIZATIONS),
        default="none",
        flag="--quantize",
        help="Quantisation every worker applies: none, int8 or int4 "
        "(CPU; the worker's --quantize, docs/models.md).",
    )
    host: str = setting(
        "TOKENYARD_UP_HOST", default="127.0.0.1", flag="--host", help="Address every service binds."
    )
    port: int = setting(
        "TOKENYARD_UP_PORT", parse_port, default=50051, flag="--port", help="The router's port."
    )
    http_port: int = setting(
        "TOKENYARD_UP_HTTP_PORT",
        parse_port,
        default=8000,
        flag="--http-port",
        help="Port of the router's OpenAI-compatible HTTP API (base URL http://host:port/v1).",
    )
    auth_port: int = setting(
        "TOKENYARD_UP_AUTH_PORT", parse_port, default=50052, flag="--auth-port", help="Auth's port."
    )
    worker_port: int = setting(
        "TOKENYARD_UP_WORKER_PORT",
        parse_port,
        default=50061,
        flag="--worker-port",
        help="The first worker's port; the others take the next ones.",
    )
    metrics_port: int | None = setting(
        "TOKENYARD_UP_METRICS_PORT",
        parse_port,
        default=None,
        flag="--metrics-port",
        help="First Prometheus port: router, auth, then each worker on the next ones (unset: off).",
    )
    threads: int = setting(
        "TOKENYARD_UP_THREADS",
        parse_non_negative_int,
        default=0,
        flag="--threads",
        help="torch threads per worker (0: this machine's cores divided by the workers).",
    )
    max_restarts: int = setting(
        "TOKENYARD_UP_MAX_RESTARTS",
        parse_non_negative_int,
        default=3,
        flag="--max-restarts",
        help="Restarts in a row of a service that dies before the whole stack stops.",
    )
    startup_timeout: float = setting(
        "TOKENYARD_UP_STARTUP_TIMEOUT",
        parse_positive_float,
        default=600.0,
        flag="--startup-timeout",
        help="Seconds a service may take to report SERVING (model conversion included).",
    )
    tls: bool = setting(
        "TOKENYARD_UP_TLS",
        parse_bool,
        default=False,
        flag="--tls",
        help="TLS on the router's port and mutual TLS inside, with certificates from "
        "--tls-dir (made there with openssl when missing).",
    )
    tls_dir: Path | None = setting(
        "TOKENYARD_UP_TLS_DIR",
        parse_path,
        default=None,
        flag="--tls-dir",
        help="Folder with ca.pem and router/auth/worker .pem/.key (default: <state>/tls).",
    )
    database_url: str | None = setting(
        "TOKENYARD_AUTH_DATABASE_URL",
        parse_database_url,
        default=None,
        flag="--database-url",
        help="Auth's database, e.g. postgresql+psycopg://user@host/db "
        "(default: SQLite in the state folder).",
    )
    redis_url: str | None = setting(
        "TOKENYARD_REDIS_URL",
        parse_redis_url,
        default=None,
        flag="--redis-url",
        secret=True,
        help="Redis for the router's rate limits and slots (default: in-process). "
        "A URL with a password belongs in the variable: a flag shows in `ps`.",
    )


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """Where `tokenyard generate` and `tokenyard chat` connect, and with which key."""

    address: str = setting(
        "TOKENYARD_ADDRESS",
        parse_address,
        default="127.0.0.1:50051",
        flag="--address",
        help="Router host:port for generate and chat.",
    )
    api_key: str | None = setting(
        "TOKENYARD_API_KEY",
        default=None,
        secret=True,
        help="API key for generate and chat (default: the demo key in the state folder).",
    )
    model: str | None = setting(
        "TOKENYARD_MODEL",
        default=None,
        flag="--model",
        help="Model for generate and chat (default: the first one the router lists).",
    )
    state_dir: Path = state_dir_setting()
