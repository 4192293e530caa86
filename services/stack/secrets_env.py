"""`tokenyard compose-secrets`: fill the empty secrets of docker-compose's `.env`.

The committed `.env` ships every secret empty, and docker-compose.yml refuses to
start until each is set. This fills the empty ones with fresh CSPRNG values,
keeps every other line as it was (a secret already set is never replaced: the
database and existing API key digests depend on it), and leaves the file 0600.
Values are printed by name only, never by value.

It needs only the standard library, so a clone without tokenyard installed runs
it as `python3 -m services.stack.secrets_env`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

# Each gets 32 random bytes (43 URL-safe characters: they go into redis:// and
# postgresql:// URLs unescaped).
SECRET_NAMES = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "TOKENYARD_AUTH_KEY_PEPPER",
    "TOKENYARD_SERVICE_TOKEN",
)
SECRET_BYTES = 32
# Shorter than this, a kept value is reported as weak (what 32 random bytes
# need in base64, and the service token length the services demand).
MIN_LENGTH = 32
# Values an earlier .env of this repository shipped: public, so never secret.
PUBLISHED = frozenset(
    {
        "tokenyard-dev-only",
        "dev-only-pepper-change-me-0123456789abcdef",
        "dev-only-service-token-change-me-0123456789",
    }
)


@dataclass
class Outcome:
    """What `fill_env_file` did, by variable name (never values)."""

    filled: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    weak: list[str] = field(default_factory=list)


def new_secret() -> str:
    """A fresh secret: 32 bytes from the CSPRNG, URL-safe base64 without padding."""
    return secrets.token_urlsafe(SECRET_BYTES)


def env_value(raw: str) -> str:
    """The value compose reads from the text after `NAME=` (quotes, inline comments)."""
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if value.startswith("#"):
        return ""
    return value.split(" #", 1)[0].rstrip()


def _name_of(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or "=" not in stripped:
        return None
    name = stripped.split("=", 1)[0].strip()
    return name.removeprefix("export ").strip()


def fill_text(text: str, names: Sequence[str] = SECRET_NAMES) -> tuple[str, Outcome]:
    """`text` with each empty or missing secret in `names` filled; other lines untouched."""
    outcome = Outcome()
    lines = text.splitlines(keepends=True)
    seen: set[str] = set()
    for i, line in enumerate(lines):
        name = _name_of(line)
        if name is None or name not in names or name in seen:
            continue
        seen.add(name)
        value = env_value(line.split("=", 1)[1])
        if value:
            outcome.kept.append(name)
            if len(value) < MIN_LENGTH or value in PUBLISHED:
                outcome.weak.append(name)
            continue
        ending = "\n" if line.endswith("\n") else ""
        lines[i] = f"{name}={new_secret()}{ending}"
        outcome.filled.append(name)
    missing = [n for n in names if n not in seen]
    if missing:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append("# Secrets written by `tokenyard compose-secrets`.\n")
        for name in missing:
            lines.append(f"{name}={new_secret()}\n")
            outcome.filled.append(name)
    return "".join(lines), outcome


def fill_env_file(path: Path, names: Sequence[str] = SECRET_NAMES) -> Outcome:
    """Fill the empty secrets of the .env file at `path` (created if missing); mode 0600.

    The new content replaces the file atomically (a reader never sees half of it),
    and the file is only rewritten when a secret was filled.
    """
    path = path.resolve()
    text = path.read_text() if path.exists() else ""
    new_text, outcome = fill_text(text, names)
    if new_text != text or not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=".env.", dir=path.parent)  # created 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(new_text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    path.chmod(0o600)
    return outcome


def report(outcome: Outcome, path: Path, out: TextIO, err: TextIO) -> int:
    """Print what was done (names only); 1 when a kept secret is weak or published."""
    if outcome.filled:
        print(f"filled {', '.join(outcome.filled)} in {path} (mode 0600)", file=out)
        print(f"{path} now holds secrets: never commit it", file=out)
    if outcome.kept:
        print(f"kept {', '.join(outcome.kept)} (already set)", file=out)
    for name in outcome.weak:
        print(
            f"warning: {name} is shorter than {MIN_LENGTH} characters or a value this "
            "repository once published: set a new one (changing POSTGRES_PASSWORD after "
            "the first start also needs ALTER USER in the database)",
            file=err,
        )
    return 1 if outcome.weak else 0


def _handle(args: argparse.Namespace) -> int:
    outcome = fill_env_file(args.env_file)
    return report(outcome, args.env_file, sys.stdout, sys.stderr)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--env-file", type=Path, default=Path(".env"), help="the file to fill (default: .env)"
    )
    p.set_defaults(handler=_handle)


def register(subparsers: Any) -> None:
    """Add `compose-secrets` to the `tokenyard` parser."""
    p = subparsers.add_parser(
        "compose-secrets",
        help="fill the empty secrets of docker-compose's .env with random values",
        description="Fills POSTGRES_PASSWORD, REDIS_PASSWORD, TOKENYARD_AUTH_KEY_PEPPER and "
        "TOKENYARD_SERVICE_TOKEN where empty; keeps everything else; the file ends 0600.",
    )
    _add_arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    """`python3 -m services.stack.secrets_env`: the same command without tokenyard installed."""
    parser = argparse.ArgumentParser(prog="python3 -m services.stack.secrets_env")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
