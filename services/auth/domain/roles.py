"""RoleService's domain: roles are permissions, model patterns and limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.auth.db.models import RoleRow, UserRoleRow
from services.auth.domain import audit, grants, pages, validation
from services.auth.domain.permissions import (
    ADMIN,
    Limits,
    validate_patterns,
    validate_permissions,
)
from services.auth.domain.principal import Caller, utcnow
from services.auth.domain.revocations import Revocations
from services.common.errors import AlreadyExists, FailedPrecondition, NotFound

if TYPE_CHECKING:
    from services.auth.core import AuthCore

ROLE_MASK = ("description", "permissions", "allowed_models", "limits")


@dataclass(frozen=True)
class RoleSpec:
    """A role's fields as a request gives them."""

    name: str
    description: str = ""
    permissions: tuple[str, ...] = ()
    allowed_models: tuple[str, ...] = ()
    limits: Limits = Limits()


def check_spec(caller: Caller, spec: RoleSpec, paths: tuple[str, ...] = ROLE_MASK) -> None:
    """Validate the fields named in `paths` and refuse anything beyond the caller's own."""
    p = caller.principal
    if "description" in paths:
        validation.text(spec.description, "role.description", 500)
    if "permissions" in paths:
        validate_permissions(spec.permissions, "role.permissions")
        grants.check_permissions(p, spec.permissions, "role.permissions")
    if "allowed_models" in paths:
        validate_patterns(spec.allowed_models, "role.allowed_models")
        grants.check_models(p, spec.allowed_models, "role.allowed_models")
    if "limits" in paths:
        grants.check_limits(p, spec.limits, "role.limits")


class Roles:
    """Role administration over an AuthCore."""

    def __init__(self, core: AuthCore) -> None:
        self.core = core

    async def create(self, caller: Caller, spec: RoleSpec, request_id: str) -> RoleRow:
        """Create a role (idempotent by request_id)."""
        await self.core.require(caller, "roles.admin", "CreateRole", "role", spec.name[:64])
        validation.role_name(spec.name, "role.name")
        validation.request_id(request_id)
        check_spec(caller, spec)
        return await self.core.mutate(self._create, caller, spec, request_id)

    @staticmethod
    def _create(
        session: Session, _: Revocations, caller: Caller, spec: RoleSpec, request_id: str
    ) -> RoleRow:
        if request_id:
            earlier = session.scalar(select(RoleRow).where(RoleRow.request_id == request_id))
            if earlier is not None:
                return earlier
        if session.get(RoleRow, spec.name) is not None:
            raise AlreadyExists(f"role {spec.name!r} already exists", reason="ROLE_EXISTS")
        now = utcnow()
        role = RoleRow(
            name=spec.name,
            description=spec.description,
            permissions=sorted(set(spec.permissions)),
            allowed_models=sorted(set(spec.allowed_models)),
            limits=spec.limits.to_json(),
            created_at=now,
            updated_at=now,
            request_id=request_id or None,
        )
        session.add(role)
        audit.record(
            session,
            "role.create",
            caller=caller,
            object_type="role",
            object_id=spec.name,
            details={"permissions": ",".join(role.permissions)},
        )
        return role

    async def get(self, caller: Caller, name: str) -> RoleRow:
        """One role."""
        await self.core.require(caller, "roles.admin", "GetRole", "role", name[:64])
        validation.role_name(name)
        role: RoleRow | None = await self.core.db.read(lambda s: s.get(RoleRow, name))
        if role is None:
            raise NotFound(f"role {name!r} not found", reason="ROLE_NOT_FOUND")
        return role

    async def list_page(self, caller: Caller, size: int, token: str) -> tuple[list[RoleRow], str]:
        """A page of roles ordered by name."""
        await self.core.require(caller, "roles.admin", "ListRoles")
        return await pages.by_unique_column(self.core.db, RoleRow.name, size, token, "roles")

    async def update(self, caller: Caller, spec: RoleSpec, paths: list[str]) -> RoleRow:
        """Change the masked fields; holders' cached principals are dropped."""
        await self.core.require(caller, "roles.admin", "UpdateRole", "role", spec.name[:64])
        validation.role_name(spec.name, "role.name")
        masked = tuple(grants.mask_paths(paths, ROLE_MASK))
        check_spec(caller, spec, masked)
        return await self.core.mutate(self._update, caller, spec, masked)

    @staticmethod
    def _update(
        session: Session, pending: Revocations, caller: Caller, spec: RoleSpec, paths: tuple[str]
    ) -> RoleRow:
        role = session.get(RoleRow, spec.name)
        if role is None:
            raise NotFound(f"role {spec.name!r} not found", reason="ROLE_NOT_FOUND")
        if ADMIN in role.permissions and not caller.principal.has(ADMIN):
            raise grants.escalation("only admins change an admin role", "role")
        grants.check_roles(caller.principal, [role], "role.name")
        if "description" in paths:
            role.description = spec.description
        if "permissions" in paths:
            if ADMIN in role.permissions and ADMIN not in spec.permissions:
                from services.auth.domain.users import admin_count

                role.permissions = sorted(set(spec.permissions))
                session.flush()
                if admin_count(session) == 0:
                    raise FailedPrecondition(
                        "the last admin cannot lose admin rights", reason="LAST_ADMIN"
                    )
            role.permissions = sorted(set(spec.permissions))
        if "allowed_models" in paths:
            role.allowed_models = sorted(set(spec.allowed_models))
        if "limits" in paths:
            role.limits = spec.limits.to_json()
        role.updated_at = utcnow()
        holders = session.scalars(
            select(UserRoleRow.user_id).where(UserRoleRow.role_name == spec.name)
        )
        pending.add(session, user_ids=list(holders))
        audit.record(
            session,
            "role.update",
            caller=caller,
            object_type="role",
            object_id=spec.name,
            details={"fields": ",".join(paths)},
        )
        return role

    async def delete(self, caller: Caller, name: str) -> None:
        """Delete a role no user holds."""
        await self.core.require(caller, "roles.admin", "DeleteRole", "role", name[:64])
        validation.role_name(name)
        await self.core.mutate(self._delete, caller, name)

    @staticmethod
    def _delete(session: Session, _: Revocations, caller: Caller, name: str) -> None:
        role = session.get(RoleRow, name)
        if role is None:
            raise NotFound(f"role {name!r} not found", reason="ROLE_NOT_FOUND")
        if ADMIN in role.permissions and not caller.principal.has(ADMIN):
            raise grants.escalation("only admins delete an admin role", "name")
        grants.check_roles(caller.principal, [role], "name")
        held = session.scalar(
            select(func.count()).select_from(UserRoleRow).where(UserRoleRow.role_name == name)
        )
        if held:
            raise FailedPrecondition(
                f"role {name!r} is held by {held} user(s); take it from them first",
                reason="ROLE_IN_USE",
            )
        session.delete(role)
        audit.record(session, "role.delete", caller=caller, object_type="role", object_id=name)
