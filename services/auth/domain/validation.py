"""Checks of request fields shared by every RPC: names, ids, request ids, times."""

from __future__ import annotations

import re
import uuid

from services.common.errors import InvalidArgument

USERNAME_RE = re.compile(r"[a-z][a-z0-9._-]{2,63}")
ROLE_RE = re.compile(r"[a-z][a-z0-9._-]{1,63}")


def username(value: str, field: str = "username") -> str:
    """3 to 64 characters of [a-z0-9._-], starting with a letter."""
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if not USERNAME_RE.fullmatch(value):
        raise InvalidArgument(
            field, "must be 3 to 64 characters of a-z, 0-9, '.', '_', '-', starting with a letter"
        )
    return value


def role_name(value: str, field: str = "name") -> str:
    """2 to 64 characters of [a-z0-9._-], starting with a letter."""
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if not ROLE_RE.fullmatch(value):
        raise InvalidArgument(
            field, "must be 2 to 64 characters of a-z, 0-9, '.', '_', '-', starting with a letter"
        )
    return value


def text(value: str, field: str, max_chars: int, *, required: bool = False) -> str:
    """Free text up to `max_chars`, printable, no control characters."""
    if required and not value.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"must be at most {max_chars} characters")
    if not value.isprintable():
        raise InvalidArgument(field, "must not contain control characters")
    return value


def object_id(value: str, field: str) -> str:
    """A server-assigned id (UUID)."""
    if not value:
        raise InvalidArgument(field, "must not be empty")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(field, "must be an id returned by the server (a UUID)") from None


def optional_id(value: str, field: str) -> str:
    """Empty, or a server-assigned id."""
    return object_id(value, field) if value else ""


def request_id(value: str, field: str = "request_id") -> str | None:
    """Client-chosen idempotency key, up to 128 printable characters (empty: none)."""
    if not value:
        return None
    return text(value, field, 128)


def new_id() -> str:
    """A fresh object id."""
    return str(uuid.uuid4())
