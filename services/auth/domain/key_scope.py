"""What a new or changed API key may hold: within its owner's grants and its maker's.

Stored empty, a key's `allowed_models` means "all of the owner's", so narrowing
must never produce an empty list by intersection: that is refused instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from services.auth.db.models import UserRow
from services.auth.domain import grants
from services.auth.domain.permissions import (
    Limits,
    min_limits,
    pattern_covered,
    validate_patterns,
    validate_permissions,
)
from services.auth.domain.principal import Caller, owner_grants
from services.common.errors import PermissionDenied


@dataclass(frozen=True)
class KeySpec:
    """A key's settable fields."""

    name: str = ""
    permissions: tuple[str, ...] = ()
    allowed_models: tuple[str, ...] = ()
    limits: Limits = Limits()
    expire_time: datetime | None = None


def narrowed(caller: Caller, owner: UserRow, spec: KeySpec, field: str) -> KeySpec:
    """The spec as stored: within the owner's grants and the caller's own, or refused.

    Stored empty, `allowed_models` means "all of the owner's", so a caller who may
    use only some of them stores the shared patterns, and none shared is a refusal.
    Acting on someone else's keys needs everything they hold within the caller's own.
    """
    o_perms, o_models, _ = owner_grants(owner)
    p = caller.principal
    models = validate_patterns(spec.allowed_models, f"{field}allowed_models")
    for m in models:
        if not pattern_covered(m, o_models):
            raise grants.escalation(f"the owner may not use {m!r}", f"{field}allowed_models")
    grants.check_models(p, models, f"{field}allowed_models")
    if not models and not all(pattern_covered(m, p.allowed_models) for m in o_models):
        models = common_models(p.allowed_models, o_models)
        if not models:
            raise grants.escalation(
                "the caller and the owner share no model: the key would allow none",
                f"{field}allowed_models",
            )
    perms = validate_permissions(spec.permissions, f"{field}permissions")
    for perm in perms:
        if perm not in o_perms:
            raise grants.escalation(f"the owner does not hold {perm!r}", f"{field}permissions")
    grants.check_permissions(p, perms, f"{field}permissions")
    if owner.id != p.user_id:
        grants.check_target(p, owner, f"{field}user_id")
    if not perms and not o_perms <= p.permissions:
        perms = sorted(o_perms & p.permissions)
        if not perms:
            raise PermissionDenied("the key would hold no permission", reason="NO_PERMISSION")
    limits = min_limits([spec.limits, p.limits])
    return KeySpec(spec.name, tuple(perms), tuple(models), limits, spec.expire_time)


def common_models(mine: Sequence[str], theirs: Sequence[str]) -> list[str]:
    """The patterns matching only models both sides may use (the narrower of each pair)."""
    out = {m for m in mine if pattern_covered(m, theirs)}
    out |= {m for m in theirs if pattern_covered(m, mine)}
    return sorted(out)
