"""The state folder of `tokenyard up` (`.tokenyard/` by default).

It holds the auth database, the generated service token and key pepper, the demo
API key and the model cache. Secrets are created once, readable by the owner only
(0600, in a 0700 folder), and reused on every later start.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.settings import SettingsError, parse_path, setting

SERVICE_TOKEN = "service-token"
KEY_PEPPER = "key-pepper"
ADMIN_PASSWORD = "admin-password"
DEMO_KEY = "demo-key"
ADMIN_KEY = "admin-key"
DEFAULT_STATE_DIR = Path(".tokenyard")


def state_dir_setting() -> Any:
    """The `TOKENYARD_STATE_DIR` setting, for every settings class that needs the folder."""
    return setting(
        "TOKENYARD_STATE_DIR",
        parse_path,
        default=DEFAULT_STATE_DIR,
        flag="--state-dir",
        help="Folder of the local stack's database, secrets and demo and admin keys.",
    )


def key_in_state(state_dir: Path, name: str) -> str:
    """The API key `tokenyard up` left in `state_dir/name` (the CLIs' default key)."""
    path = state_dir / name
    key = path.read_text().strip() if path.is_file() else ""
    if not key:
        raise SettingsError(
            f"TOKENYARD_API_KEY: not set, and no key in {path} (start the stack: tokenyard up)"
        )
    return key


def write_private(path: Path, text: str) -> None:
    """Create `path` with mode 0600 holding `text` (never readable by others, even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (text + "\n").encode())
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class StateDir:
    """Paths and secrets inside the state folder."""

    root: Path

    def ensure(self) -> None:
        """Create the folder (0700) if missing."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    @property
    def database_url(self) -> str:
        """SQLite database of the auth service."""
        return f"sqlite:///{(self.root / 'auth.db').resolve()}"

    @property
    def model_cache(self) -> Path:
        """Where converted models are cached (shared by the workers)."""
        return self.root / "models"

    def path(self, name: str) -> Path:
        """A file in the folder."""
        return self.root / name

    def read(self, name: str) -> str | None:
        """The stripped content of a file, None when it is absent or empty."""
        try:
            text = self.path(name).read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def secret(self, name: str, nbytes: int = 32) -> str:
        """The secret kept in `name`, generated on first use."""
        existing = self.read(name)
        if existing is not None:
            return existing
        value = secrets.token_urlsafe(nbytes)
        write_private(self.path(name), value)
        return value

    def demo_key(self) -> str | None:
        """The demo API key written on first start, if any."""
        return self.read(DEMO_KEY)

    def save_demo_key(self, key: str) -> Path:
        """Keep the demo key (0600) so later starts and `tokenyard generate` reuse it."""
        write_private(self.path(DEMO_KEY), key)
        return self.path(DEMO_KEY)
