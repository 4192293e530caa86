"""Password hashing: argon2id, re-hashed when the cost rises, length-capped.

Verifying an unknown user hashes against a dummy so the answer takes as long as
for a wrong password: no user enumeration by timing.
"""

from __future__ import annotations

import functools

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from services.common.errors import InvalidArgument

MIN_PASSWORD_BYTES = 8
MAX_PASSWORD_BYTES = 1024


def check_length(password: str, field: str = "password") -> bytes:
    """The password's UTF-8 bytes, refusing empty, short or over-long ones (no truncation)."""
    raw = password.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise InvalidArgument(field, f"must be at most {MAX_PASSWORD_BYTES} bytes")
    if len(raw) < MIN_PASSWORD_BYTES:
        raise InvalidArgument(field, f"must be at least {MIN_PASSWORD_BYTES} bytes")
    return raw


class Passwords:
    """argon2id hasher with a dummy hash for unknown users."""

    def __init__(self, time_cost: int, memory_kib: int, parallelism: int) -> None:
        self.hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_kib,
            parallelism=parallelism,
            type=Type.ID,
        )

    @functools.cached_property
    def _dummy(self) -> str:
        """A hash to verify against when the user is unknown (made on first use)."""
        return str(self.hasher.hash("dummy password for timing equality"))

    def hash(self, password: str) -> str:
        """A new argon2id hash (validates the length first)."""
        return self.hasher.hash(check_length(password))

    def verify(self, stored: str | None, password: str) -> bool:
        """True when `password` matches `stored`; hashes a dummy when there is none."""
        raw = password.encode("utf-8", "surrogatepass")[: MAX_PASSWORD_BYTES + 1]
        if len(raw) > MAX_PASSWORD_BYTES:
            raise InvalidArgument("password", f"must be at most {MAX_PASSWORD_BYTES} bytes")
        try:
            return bool(self.hasher.verify(stored or self._dummy, raw)) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        """Whether `stored` was made with weaker parameters than the current ones."""
        return bool(self.hasher.check_needs_rehash(stored))
