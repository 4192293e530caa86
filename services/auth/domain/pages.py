"""AIP-158 pagination: page sizes and opaque page tokens bound to their filter."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.common.errors import InvalidArgument

if TYPE_CHECKING:
    from services.auth.db.engine import Database

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(value: int) -> int:
    """0 means the default; 1 to 1000 otherwise."""
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 0 < value <= MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
    return value


def _fingerprint(filters: Any) -> str:
    text = json.dumps(filters, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(position: list[Any], filters: Any = None) -> str:
    """An opaque token for the page after `position` under `filters`."""
    raw = json.dumps({"p": position, "f": _fingerprint(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(token: str, filters: Any = None, arity: int = 1) -> list[Any] | None:
    """The position in `token` (None for an empty token); malformed → INVALID_ARGUMENT."""
    if not token:
        return None
    try:
        if len(token) > 1024:
            raise ValueError
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        position = data["p"]
        if not isinstance(position, list) or len(position) != arity:
            raise ValueError
        if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in position):
            raise ValueError
        if any(isinstance(v, str) and (len(v) > 200 or not v.isprintable()) for v in position):
            raise ValueError
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("page_token", "malformed page token") from None
    if data.get("f") != _fingerprint(filters):
        raise InvalidArgument("page_token", "page token does not match the request's filters")
    return position


async def by_unique_column(
    db: Database, column: Any, size: int, token: str, kind: str
) -> tuple[list[Any], str]:
    """A page of the rows of `column`'s table, ordered by that unique string column.

    Keyset pagination: the token holds the last value seen, so pages stay stable
    while rows are added; `kind` binds the token to this listing.
    """
    limit = page_size(size)
    after = decode(token, kind)

    def query(session: Session) -> list[Any]:
        stmt = select(column.class_).order_by(column).limit(limit + 1)
        if after is not None:
            stmt = stmt.where(column > str(after[0]))
        return list(session.scalars(stmt))

    rows = await db.read(query)
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    return rows, encode([getattr(rows[-1], column.key)], kind)
