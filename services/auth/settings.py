"""Settings of the auth service, from `TOKENYARD_AUTH_*` variables and CLI flags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.config import (
    InternalSettings,
    ObservabilitySettings,
    ServerSettings,
    check_internal_exposure,
    port_setting,
)
from services.common.settings import (
    SettingsError,
    load_settings,
    parse_existing_file,
    parse_list,
    parse_non_negative_float,
    parse_positive_float,
    parse_positive_int,
    parse_url,
    setting,
)

SERVICE = "auth"
DEFAULT_PORT = 50052
DEFAULT_DATABASE_URL = "sqlite:///.tokenyard/auth.db"


def parse_database_url(raw: str) -> str:
    """A SQLAlchemy URL for SQLite or PostgreSQL (psycopg 3)."""
    parse_url("sqlite", "postgresql")(raw)
    if raw.startswith("postgresql") and not raw.startswith("postgresql+psycopg:"):
        raise ValueError("use the psycopg driver: postgresql+psycopg://user@host/db")
    return raw


def parse_old_peppers(raw: str) -> tuple[tuple[int, str], ...]:
    """Earlier peppers as `VERSION:PEPPER` pairs, comma-separated."""
    out: list[tuple[int, str]] = []
    for item in parse_list(raw):
        version, sep, pepper = item.partition(":")
        if not sep or not version.isdigit() or len(pepper) < 16:
            raise ValueError("expected VERSION:PEPPER pairs, peppers of 16+ characters")
        out.append((int(version), pepper))
    return tuple(out)


def parse_pepper(raw: str) -> str:
    """A pepper of at least 16 characters (32 random bytes recommended)."""
    if len(raw) < 16:
        raise ValueError("expected at least 16 characters")
    return raw


@dataclass(frozen=True)
class AuthServerSettings(ServerSettings):
    """Auth's listener: as every service's, on port 50052 by default."""

    port: int = port_setting(DEFAULT_PORT)


@dataclass(frozen=True)
class Argon2Settings:
    """argon2id cost; defaults exceed OWASP's minimum (19 MiB, t=2, p=1)."""

    time_cost: int = setting(
        "TOKENYARD_AUTH_ARGON2_TIME_COST", parse_positive_int, default=3, help="argon2 passes."
    )
    memory_kib: int = setting(
        "TOKENYARD_AUTH_ARGON2_MEMORY_KIB",
        parse_positive_int,
        default=65536,
        help="argon2 memory in KiB.",
    )
    parallelism: int = setting(
        "TOKENYARD_AUTH_ARGON2_PARALLELISM", parse_positive_int, default=4, help="argon2 lanes."
    )


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    """Everything `tokenyard auth serve` needs; built once in the entry point."""

    server: AuthServerSettings = field(default_factory=AuthServerSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    internal: InternalSettings = field(default_factory=InternalSettings)
    argon2: Argon2Settings = field(default_factory=Argon2Settings)
    database_url: str = setting(
        "TOKENYARD_AUTH_DATABASE_URL",
        parse_database_url,
        default=DEFAULT_DATABASE_URL,
        flag="--database-url",
        help="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db.",
    )
    key_pepper: str | None = setting(
        "TOKENYARD_AUTH_KEY_PEPPER",
        parse_pepper,
        default=None,
        secret=True,
        help="Secret for API key digests (HMAC-SHA256); required unless a pepper file is set.",
    )
    bootstrap_password: str | None = setting(
        "TOKENYARD_AUTH_BOOTSTRAP_PASSWORD",
        default=None,
        secret=True,
        help="Password of the first admin for `tokenyard auth bootstrap` "
        "(unset: asked in a terminal).",
    )
    key_pepper_file: Path | None = setting(
        "TOKENYARD_AUTH_KEY_PEPPER_FILE",
        parse_existing_file,
        default=None,
        help="File holding the pepper (used when TOKENYARD_AUTH_KEY_PEPPER is unset).",
    )
    key_pepper_version: int = setting(
        "TOKENYARD_AUTH_KEY_PEPPER_VERSION",
        parse_positive_int,
        default=1,
        help="Version of the current pepper, stored with each digest.",
    )
    old_key_peppers: tuple[tuple[int, str], ...] = setting(
        "TOKENYARD_AUTH_OLD_KEY_PEPPERS",
        parse_old_peppers,
        default=(),
        secret=True,
        help="Earlier peppers still accepted, as VERSION:PEPPER,...",
    )
    cache_ttl: float = setting(
        "TOKENYARD_AUTH_CACHE_TTL",
        parse_non_negative_float,
        default=5.0,
        help="Seconds a router may cache an Authenticate answer.",
    )
    principal_cache_ttl: float = setting(
        "TOKENYARD_AUTH_PRINCIPAL_CACHE_TTL",
        parse_non_negative_float,
        default=2.0,
        help="Seconds auth itself caches a resolved key (0: off).",
    )
    session_ttl: float = setting(
        "TOKENYARD_AUTH_SESSION_TTL",
        parse_positive_float,
        default=12 * 3600.0,
        help="Seconds a login session lasts.",
    )
    lockout_threshold: int = setting(
        "TOKENYARD_AUTH_LOCKOUT_THRESHOLD",
        parse_positive_int,
        default=5,
        help="Failed logins in a row before an account locks.",
    )
    lockout_seconds: float = setting(
        "TOKENYARD_AUTH_LOCKOUT_SECONDS",
        parse_positive_float,
        default=60.0,
        help="First lockout; doubles with each further failure.",
    )
    lockout_max_seconds: float = setting(
        "TOKENYARD_AUTH_LOCKOUT_MAX_SECONDS",
        parse_positive_float,
        default=3600.0,
        help="Longest lockout.",
    )
    last_used_flush_seconds: float = setting(
        "TOKENYARD_AUTH_LAST_USED_FLUSH_SECONDS",
        parse_positive_float,
        default=30.0,
        help="How often key last-used times are written (batched).",
    )
    revocation_poll_seconds: float = setting(
        "TOKENYARD_AUTH_REVOCATION_POLL_SECONDS",
        parse_positive_float,
        default=1.0,
        help="How often revocations made by other replicas are read.",
    )

    audit_rows_per_minute: int = setting(
        "TOKENYARD_AUTH_AUDIT_ROWS_PER_MINUTE",
        parse_positive_int,
        default=10,
        help="Failed logins and permission denials written as audit rows per peer and per "
        "user each minute; the rest are only counted (audit_tallies).",
    )

    def peppers(self) -> dict[int, str]:
        """Every accepted pepper by version, the current one included."""
        current = self.current_pepper()
        out = dict(self.old_key_peppers)
        out[self.key_pepper_version] = current
        return out

    def current_pepper(self) -> str:
        """The pepper new digests use (from the variable or the file)."""
        if self.key_pepper:
            return self.key_pepper
        if self.key_pepper_file is not None:
            return parse_pepper(self.key_pepper_file.read_text().strip())
        raise ValueError("no pepper")


def load_auth_settings(
    environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> AuthSettings:
    """Load AuthSettings: port 50052 unless set, and a pepper from one of its two sources."""
    settings = load_settings(AuthSettings, environ, overrides, service=SERVICE)
    if settings.key_pepper is None and settings.key_pepper_file is None:
        raise SettingsError(
            "TOKENYARD_AUTH_KEY_PEPPER: required unless TOKENYARD_AUTH_KEY_PEPPER_FILE is set"
        )
    if settings.key_pepper is None and settings.key_pepper_file is not None:
        try:
            settings.current_pepper()
        except ValueError as exc:
            raise SettingsError(f"TOKENYARD_AUTH_KEY_PEPPER_FILE: {exc}") from None
    check_internal_exposure("TOKENYARD_AUTH_HOST", settings.server.host, settings.internal)
    return settings
