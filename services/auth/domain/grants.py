"""No escalation: what a caller may grant, and field-mask checks for updates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from services.auth.db.models import RoleRow, UserRow
from services.auth.domain.permissions import (
    ADMIN,
    Limits,
    expand,
    limits_within,
    pattern_covered,
    with_default_caps,
)
from services.auth.domain.principal import Principal, owner_grants
from services.common.errors import InvalidArgument, PermissionDenied


def escalation(message: str, field: str) -> PermissionDenied:
    """The error for an attempt to grant beyond one's own."""
    return PermissionDenied(message, reason="PERMISSION_ESCALATION", metadata={"field": field})


def check_permissions(caller: Principal, perms: Iterable[str], field: str) -> None:
    """Refuse permissions the caller does not hold; "admin" only from admins."""
    for perm in sorted(set(perms)):
        if perm == ADMIN and not caller.has(ADMIN):
            raise escalation("only admins grant the 'admin' permission", field)
        if not caller.has(perm):
            raise escalation(f"cannot grant {perm!r}: the caller does not hold it", field)


def check_models(caller: Principal, patterns: Iterable[str], field: str) -> None:
    """Refuse model patterns beyond the caller's own."""
    for p in patterns:
        if not pattern_covered(p, caller.allowed_models):
            raise escalation(f"cannot grant model pattern {p!r} beyond the caller's", field)


def check_limits(caller: Principal, limits: Limits, field: str) -> None:
    """Refuse limits looser than the caller's own.

    A default cap the caller's levels leave unset (`max_priority`) bounds what a
    non-admin grants at its default; an admin's unset cap, like any unset limit
    of theirs, bounds nothing.
    """
    holder = caller.limits if caller.has(ADMIN) else with_default_caps(caller.limits)
    loose = limits_within(limits, holder)
    if loose is not None:
        raise escalation(f"cannot grant {loose} looser than the caller's own", field)


def check_within(
    caller: Principal,
    perms: Iterable[str],
    models: Iterable[str],
    limits: Limits,
    field: str,
) -> None:
    """The one no-escalation rule: `perms`, `models` and `limits` all within the caller's."""
    perms = expand(perms)
    if ADMIN in perms and not caller.has(ADMIN):
        raise escalation("only admins grant or act on admin rights", field)
    check_permissions(caller, perms, field)
    check_models(caller, models, field)
    check_limits(caller, limits, field)


def check_roles(caller: Principal, roles: Sequence[RoleRow], field: str = "roles") -> None:
    """Refuse granting roles that carry more than the caller holds."""
    for role in roles:
        check_within(
            caller, role.permissions, role.allowed_models, Limits.from_json(role.limits), field
        )


def check_target(caller: Principal, user: UserRow, field: str) -> None:
    """Refuse acting on `user` (password, roles, disable, delete, keys acting as them)
    unless everything the user holds is within the caller's own; a user holding
    nothing is within anyone's."""
    if not user.roles:
        return
    perms, models, limits = owner_grants(user)
    try:
        check_within(caller, perms, models, limits, field)
    except PermissionDenied:
        raise PermissionDenied(
            "cannot act on a user who holds more than the caller",
            reason="PERMISSION_ESCALATION",
            metadata={"field": field},
        ) from None


def mask_paths(paths: Sequence[str], allowed: Sequence[str]) -> list[str]:
    """The update_mask paths, each one of `allowed`; an empty mask is refused."""
    if not paths:
        raise InvalidArgument("update_mask", f"name at least one of: {', '.join(allowed)}")
    for path in paths:
        if path not in allowed:
            raise InvalidArgument(
                "update_mask", f"unknown field {path[:64]!r} (allowed: {', '.join(allowed)})"
            )
    return list(dict.fromkeys(paths))
