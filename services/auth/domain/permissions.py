"""Permissions, model patterns and limits: what a principal may do, and narrowing.

Pure functions: a key narrows its owner, a role or grant never exceeds its
creator, and effective limits are the minimum over key and roles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument

ADMIN = "admin"
PERMISSIONS = frozenset(
    {
        "generate",
        "models.list",
        "keys.manage_own",
        "keys.admin",
        "users.admin",
        "roles.admin",
        "usage.read",
        "audit.read",
        ADMIN,
    }
)
LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_streams",
    "max_tokens_per_request",
    "token_quota",
)
QUOTA_PERIODS = ("day", "month")


def expand(perms: Iterable[str]) -> frozenset[str]:
    """Permissions with "admin" expanded to all of them."""
    got = frozenset(perms)
    return PERMISSIONS if ADMIN in got else got


def validate_permissions(perms: Iterable[str], field_name: str) -> list[str]:
    """Sorted unique permission names; unknown ones are refused, naming them."""
    out = sorted(set(perms))
    unknown = [p for p in out if p not in PERMISSIONS]
    if unknown:
        raise InvalidArgument(
            field_name,
            f"unknown permission {unknown[0]!r} (known: {', '.join(sorted(PERMISSIONS))})",
        )
    return out


def validate_patterns(patterns: Iterable[str], field_name: str) -> list[str]:
    """Sorted unique model patterns: a name, a prefix ending in "*", or "*"."""
    out = sorted(set(patterns))
    for p in out:
        body = p[:-1] if p.endswith("*") else p
        if (
            not p
            or len(p) > 200
            or "*" in body
            or not all(c.isalnum() or c in "-_./:" for c in body)
        ):
            raise InvalidArgument(field_name, f"invalid model pattern {p[:50]!r}")
    return out


def pattern_covered(pattern: str, by: Iterable[str]) -> bool:
    """Whether every model `pattern` matches is matched by one of `by`."""
    for q in by:
        if q in ("*", pattern):
            return True
        if q.endswith("*") and pattern.startswith(q[:-1]):
            return True
    return False


def narrow_models(requested: list[str], owner: list[str]) -> list[str]:
    """The key's patterns that the owner's cover (all owner's when none requested)."""
    if not requested:
        return list(owner)
    return [p for p in requested if pattern_covered(p, owner)]


@dataclass(frozen=True)
class Limits:
    """Caps; None means no limit at this level."""

    values: Mapping[str, int] = field(default_factory=dict)
    quota_period: str = "day"

    def get(self, name: str) -> int | None:
        """The value of one limit, or None."""
        return self.values.get(name)

    def to_json(self) -> dict[str, int | str]:
        """Stored form."""
        out: dict[str, int | str] = {k: v for k, v in self.values.items() if v is not None}
        if "token_quota" in out:
            out["quota_period"] = self.quota_period
        return out

    @staticmethod
    def from_json(raw: Mapping[str, object] | None) -> Limits:
        """From the stored form."""
        raw = raw or {}
        values = {k: int(v) for k, v in raw.items() if k in LIMIT_FIELDS and v is not None}  # type: ignore[call-overload]
        period = str(raw.get("quota_period", "day"))
        return Limits(values, period if period in QUOTA_PERIODS else "day")


def min_limits(levels: Iterable[Limits]) -> Limits:
    """The minimum per limit over `levels`; the quota period comes with the smallest quota."""
    values: dict[str, int] = {}
    period = "day"
    for level in levels:
        for name, value in level.values.items():
            if name not in values or value < values[name]:
                values[name] = value
                if name == "token_quota":
                    period = level.quota_period
    return Limits(values, period)


def limits_within(requested: Limits, holder: Limits) -> str | None:
    """The first limit `requested` leaves looser than `holder`, or None when within."""
    for name in LIMIT_FIELDS:
        cap = holder.get(name)
        if cap is not None and (requested.get(name) is None or requested.values[name] > cap):
            return name
    return None
