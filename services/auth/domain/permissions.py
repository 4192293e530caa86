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
    "response_cache",  # 1 on, 0 off: min over levels, so off anywhere wins
)
# Limits that switch a feature on (1) or off (0) rather than cap a number.
SWITCH_FIELDS = frozenset({"response_cache"})
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


# The longest calendar month: a day quota allows at most this many days' worth a month.
MAX_DAYS_PER_MONTH = 31


def quota_caps(limits: Limits) -> tuple[int, int] | None:
    """The most tokens a quota allows (per day, per month), or None without a quota.

    Quotas of different periods compare only in one unit: 30,000 a day allows
    930,000 a month, so it is looser than 30,000 a month, not equal to it.
    """
    quota = limits.get("token_quota")
    if quota is None:
        return None
    if limits.quota_period == "month":
        return quota, quota
    return quota, quota * MAX_DAYS_PER_MONTH


def _caps_within(inner: tuple[int, int], outer: tuple[int, int]) -> bool:
    return inner[0] <= outer[0] and inner[1] <= outer[1]


def _tightest_quota(levels: list[Limits]) -> tuple[int, str] | None:
    """The quota every level's quota allows: one that is within all the others, else
    the day quota meeting every day and month cap (min(day caps, month caps // 31))."""
    quotas = [lv for lv in levels if lv.get("token_quota") is not None]
    if not quotas:
        return None
    caps = [(lv, quota_caps(lv)) for lv in quotas]
    for lv, cap in caps:
        assert cap is not None
        if all(_caps_within(cap, other) for _, other in caps if other is not None):
            return lv.values["token_quota"], lv.quota_period
    day = min(c[0] for _, c in caps if c is not None)
    month = min(c[1] for _, c in caps if c is not None)
    return min(day, month // MAX_DAYS_PER_MONTH), "day"


def min_limits(levels: Iterable[Limits]) -> Limits:
    """The minimum per limit over `levels`; quotas compare per day and per month."""
    seen = list(levels)
    values: dict[str, int] = {}
    for level in seen:
        for name, value in level.values.items():
            if name != "token_quota" and (name not in values or value < values[name]):
                values[name] = value
    quota = _tightest_quota(seen)
    if quota is None:
        return Limits(values)
    values["token_quota"] = quota[0]
    return Limits(values, quota[1])


def limits_within(requested: Limits, holder: Limits) -> str | None:
    """The first limit `requested` leaves looser than `holder`, or None when within."""
    for name in LIMIT_FIELDS:
        cap = holder.get(name)
        if cap is None:
            continue
        if name in SWITCH_FIELDS:
            # Unset never switches anything on; on is looser than the holder's off.
            if cap == 0 and requested.get(name):
                return name
            continue
        if requested.get(name) is None:
            return name
        if name == "token_quota":
            mine, theirs = quota_caps(requested), quota_caps(holder)
            assert mine is not None and theirs is not None
            if not _caps_within(mine, theirs):
                return name
        elif requested.values[name] > cap:
            return name
    return None
