"""Settings every gRPC service shares: listening, TLS, logging, telemetry."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.settings import (
    SettingsError,
    parse_bool,
    parse_choice,
    parse_existing_file,
    parse_list,
    parse_non_negative_float,
    parse_port,
    parse_positive_int,
    setting,
)

MiB = 1024 * 1024


def port_setting(default: int) -> Any:
    """The `TOKENYARD_{service}_PORT` / `--port` setting, with each service's default."""
    return setting(
        "TOKENYARD_{service}_PORT", parse_port, default=default, flag="--port", help="gRPC port."
    )


@dataclass(frozen=True)
class ServerSettings:
    """How a service listens. Variables are prefixed per service (`TOKENYARD_AUTH_PORT`)."""

    host: str = setting("TOKENYARD_{service}_HOST", default="127.0.0.1", help="Address to bind.")
    port: int = port_setting(0)
    grace_period: float = setting(
        "TOKENYARD_{service}_GRACE_PERIOD",
        parse_non_negative_float,
        default=10.0,
        help="Seconds in-flight calls get to finish on SIGTERM.",
    )
    reflection: bool = setting(
        "TOKENYARD_{service}_REFLECTION", parse_bool, default=True, help="Serve gRPC reflection."
    )
    max_message_bytes: int = setting(
        "TOKENYARD_{service}_MAX_MESSAGE_BYTES",
        parse_positive_int,
        default=16 * MiB,
        help="Largest request or response message.",
    )
    metrics_port: int | None = setting(
        "TOKENYARD_{service}_METRICS_PORT",
        parse_port,
        default=None,
        help="Port of the Prometheus /metrics endpoint (unset: off).",
    )
    tls_cert: Path | None = setting(
        "TOKENYARD_{service}_TLS_CERT",
        parse_existing_file,
        default=None,
        help="PEM certificate chain: serve TLS.",
    )
    tls_key: Path | None = setting(
        "TOKENYARD_{service}_TLS_KEY", parse_existing_file, default=None, help="PEM private key."
    )
    tls_client_ca: Path | None = setting(
        "TOKENYARD_{service}_TLS_CLIENT_CA",
        parse_existing_file,
        default=None,
        help="PEM CA bundle: require client certificates signed by it (mutual TLS).",
    )
    tls_client_names: tuple[str, ...] = setting(
        "TOKENYARD_{service}_TLS_CLIENT_NAMES",
        parse_list,
        default=("router",),
        help="With a client CA: names (DNS or IP SANs) a client certificate must carry "
        "to call internal RPCs; every service's certificate shares the CA.",
    )


@dataclass(frozen=True)
class ObservabilitySettings:
    """Logging and telemetry, the same variables for every service."""

    log_level: str = setting(
        "TOKENYARD_LOG_LEVEL",
        parse_choice("debug", "info", "warning", "error"),
        default="info",
        help="Log level.",
    )
    log_format: str = setting(
        "TOKENYARD_LOG_FORMAT",
        parse_choice("json", "text"),
        default="json",
        help="json: one JSON object per line; text: for terminals.",
    )
    otlp_endpoint: str | None = setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        default=None,
        flag="--otlp-endpoint",
        help="OTLP gRPC endpoint for traces (unset: none exported); metrics are on the "
        "Prometheus endpoint (--metrics-port).",
    )


@dataclass(frozen=True)
class InternalSettings:
    """The credential internal calls carry (router → auth, router → worker)."""

    service_token: str | None = setting(
        "TOKENYARD_SERVICE_TOKEN",
        default=None,
        secret=True,
        help="Shared secret internal callers send; workers and auth's internal RPCs "
        "refuse calls without it. Unset: internal calls are not checked (local only).",
    )
    tls_ca: Path | None = setting(
        "TOKENYARD_INTERNAL_TLS_CA",
        parse_existing_file,
        default=None,
        help="CA bundle to verify internal servers (enables TLS on internal calls).",
    )
    tls_cert: Path | None = setting(
        "TOKENYARD_INTERNAL_TLS_CERT",
        parse_existing_file,
        default=None,
        help="Client certificate for internal calls (mutual TLS).",
    )
    tls_key: Path | None = setting(
        "TOKENYARD_INTERNAL_TLS_KEY",
        parse_existing_file,
        default=None,
        help="Client key for internal calls (mutual TLS).",
    )


MIN_SERVICE_TOKEN_BYTES = 32


def is_loopback(host: str) -> bool:
    """Whether `host` binds only this machine (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def check_internal_exposure(host_variable: str, host: str, internal: InternalSettings) -> None:
    """Refuse to serve internal RPCs beyond loopback without a strong service token.

    A worker or auth bound to another address would otherwise take calls from
    anyone who can reach it; the message is the one line the CLI prints.
    """
    if is_loopback(host):
        return
    token = internal.service_token or ""
    if len(token.encode()) < MIN_SERVICE_TOKEN_BYTES:
        state = "is unset" if not token else f"is shorter than {MIN_SERVICE_TOKEN_BYTES} bytes"
        raise SettingsError(
            f"TOKENYARD_SERVICE_TOKEN {state} but {host_variable}={host} is not loopback: "
            f"set a random token of {MIN_SERVICE_TOKEN_BYTES}+ bytes "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))') or bind 127.0.0.1"
        )
