"""UserService's domain: create, read, list, update and delete users."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from services.auth.db.models import ApiKeyRow, RoleRow, SessionRow, UserRoleRow, UserRow
from services.auth.domain import audit, grants, pages, validation
from services.auth.domain.passwords import check_length
from services.auth.domain.permissions import ADMIN
from services.auth.domain.principal import Caller, utcnow
from services.auth.domain.revocations import Revocations
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from services.auth.core import AuthCore

USER_MASK = ("display_name", "roles", "disabled", "password")


@dataclass(frozen=True)
class NewUser:
    """Fields of CreateUser."""

    username: str
    password: str
    display_name: str
    roles: tuple[str, ...]
    service_account: bool
    request_id: str


@dataclass(frozen=True)
class UserChange:
    """Fields of UpdateUser: the masked paths and their new values."""

    user_id: str
    paths: tuple[str, ...]
    display_name: str = ""
    roles: tuple[str, ...] = ()
    disabled: bool = False
    password: str = ""


def load_roles(session: Session, names: tuple[str, ...], field: str = "roles") -> list[RoleRow]:
    """The named roles; an unknown name is a bad request field."""
    out = []
    for name in dict.fromkeys(names):
        validation.role_name(name, field)
        role = session.get(RoleRow, name)
        if role is None:
            raise InvalidArgument(field, f"unknown role {name!r}")
        out.append(role)
    return out


def is_admin(user: UserRow) -> bool:
    """Whether any of the user's roles carries "admin"."""
    return any(ADMIN in r.permissions for r in user.roles)


def admin_count(session: Session) -> int:
    """Enabled users holding an admin role."""
    users = session.scalars(select(UserRow).where(UserRow.disabled.is_(False)))
    return sum(1 for u in users if is_admin(u))


def set_roles(session: Session, user: UserRow, roles: list[RoleRow]) -> None:
    """Replace the user's role grants."""
    session.execute(delete(UserRoleRow).where(UserRoleRow.user_id == user.id))
    for role in roles:
        session.add(UserRoleRow(user_id=user.id, role_name=role.name))
    session.flush()
    session.expire(user, ["roles"])


class Users:
    """User administration over an AuthCore."""

    def __init__(self, core: AuthCore) -> None:
        self.core = core

    async def create(self, caller: Caller, new: NewUser) -> UserRow:
        """Create a user (idempotent by request_id)."""
        await self.core.require(caller, "users.admin", "CreateUser", "user", new.username)
        validation.username(new.username)
        validation.text(new.display_name, "display_name", 200)
        validation.request_id(new.request_id)
        if not new.password and not new.service_account:
            raise InvalidArgument("password", "required unless service_account is set")
        password_hash = None
        if new.password:
            check_length(new.password)
            password_hash = await asyncio.to_thread(self.core.passwords.hash, new.password)
        return await self.core.mutate(self._create, caller, new, password_hash)

    @staticmethod
    def _create(
        session: Session, _: Revocations, caller: Caller, new: NewUser, pw: str | None
    ) -> UserRow:
        if new.request_id:
            earlier = session.scalar(select(UserRow).where(UserRow.request_id == new.request_id))
            if earlier is not None:
                return earlier
        roles = load_roles(session, new.roles)
        grants.check_roles(caller.principal, roles)
        if session.scalar(select(UserRow.id).where(UserRow.username == new.username)):
            raise AlreadyExists(f"user {new.username!r} already exists", reason="USER_EXISTS")
        now = utcnow()
        user = UserRow(
            id=validation.new_id(),
            username=new.username,
            display_name=new.display_name,
            password_hash=pw,
            service_account=new.service_account,
            disabled=False,
            failed_logins=0,
            created_at=now,
            updated_at=now,
            request_id=new.request_id or None,
        )
        session.add(user)
        session.flush()
        set_roles(session, user, roles)
        audit.record(
            session,
            "user.create",
            caller=caller,
            object_type="user",
            object_id=user.id,
            details={"username": user.username, "roles": ",".join(r.name for r in roles)},
        )
        session.flush()
        session.refresh(user)
        return user

    async def get(self, caller: Caller, user_id: str) -> UserRow:
        """One user: oneself, or anyone with users.admin."""
        if user_id != caller.principal.user_id:
            await self.core.require(caller, "users.admin", "GetUser", "user", user_id[:64])
        uid = validation.object_id(user_id, "user_id")
        user: UserRow | None = await self.core.db.read(lambda s: s.get(UserRow, uid))
        if user is None:
            raise NotFound("user not found", reason="USER_NOT_FOUND")
        return user

    async def list_page(self, caller: Caller, size: int, token: str) -> tuple[list[UserRow], str]:
        """A page of users ordered by username."""
        await self.core.require(caller, "users.admin", "ListUsers")
        return await pages.by_unique_column(self.core.db, UserRow.username, size, token, "users")

    async def update(self, caller: Caller, change: UserChange) -> UserRow:
        """Change the masked fields; role changes follow the no-escalation rule."""
        await self.core.require(caller, "users.admin", "UpdateUser", "user", change.user_id[:64])
        validation.object_id(change.user_id, "user.user_id")
        paths = grants.mask_paths(change.paths, USER_MASK)
        if "display_name" in paths:
            validation.text(change.display_name, "user.display_name", 200)
        password_hash = None
        if "password" in paths:
            check_length(change.password)
            password_hash = await asyncio.to_thread(self.core.passwords.hash, change.password)
        return await self.core.mutate(self._update, caller, change, paths, password_hash)

    @staticmethod
    def _update(  # noqa: PLR0917 - called positionally through core.mutate
        session: Session,
        pending: Revocations,
        caller: Caller,
        change: UserChange,
        paths: list[str],
        pw: str | None,
    ) -> UserRow:
        user = session.get(UserRow, change.user_id)
        if user is None:
            raise NotFound("user not found", reason="USER_NOT_FOUND")
        if is_admin(user) and not caller.principal.has(ADMIN):
            raise grants.escalation("only admins change an admin", "user")
        grants.check_target(caller.principal, user, "user.user_id")
        if "display_name" in paths:
            user.display_name = change.display_name
        if "roles" in paths:
            roles = load_roles(session, change.roles, "user.roles")
            grants.check_roles(caller.principal, roles, "user.roles")
            set_roles(session, user, roles)
        if "disabled" in paths:
            user.disabled = change.disabled
        if pw is not None:
            user.password_hash = pw
            user.failed_logins, user.locked_until = 0, None
            live = select(SessionRow.id).where(
                SessionRow.user_id == user.id, SessionRow.revoked_at.is_(None)
            )
            sessions = list(session.scalars(live))
            session.execute(
                update(SessionRow).where(SessionRow.id.in_(sessions)).values(revoked_at=utcnow())
            )
            pending.add(session, credential_ids=sessions)
        if ("roles" in paths or "disabled" in paths) and admin_count(session) == 0:
            raise FailedPrecondition("the last admin cannot lose admin rights", reason="LAST_ADMIN")
        user.updated_at = utcnow()
        pending.add(session, user_ids=[user.id])
        audit.record(
            session,
            "user.update",
            caller=caller,
            object_type="user",
            object_id=user.id,
            details={"fields": ",".join(paths)},
        )
        session.flush()
        session.refresh(user)
        return user

    async def delete(self, caller: Caller, user_id: str) -> None:
        """Delete a user; every key and session of theirs stops working."""
        await self.core.require(caller, "users.admin", "DeleteUser", "user", user_id[:64])
        uid = validation.object_id(user_id, "user_id")
        await self.core.mutate(self._delete, caller, uid)

    @staticmethod
    def _delete(session: Session, pending: Revocations, caller: Caller, user_id: str) -> None:
        user = session.get(UserRow, user_id)
        if user is None:
            raise NotFound("user not found", reason="USER_NOT_FOUND")
        if is_admin(user) and not caller.principal.has(ADMIN):
            raise grants.escalation("only admins delete an admin", "user_id")
        grants.check_target(caller.principal, user, "user_id")
        creds = list(session.scalars(select(ApiKeyRow.id).where(ApiKeyRow.user_id == user_id)))
        creds += list(session.scalars(select(SessionRow.id).where(SessionRow.user_id == user_id)))
        session.execute(
            update(ApiKeyRow).where(ApiKeyRow.user_id == user_id).values(revoked_at=utcnow())
        )
        session.delete(user)
        session.flush()
        if is_admin(user) and admin_count(session) == 0:
            raise FailedPrecondition("the last admin cannot be deleted", reason="LAST_ADMIN")
        pending.add(session, credential_ids=creds, user_ids=[user_id])
        audit.record(
            session,
            "user.delete",
            caller=caller,
            object_type="user",
            object_id=user_id,
            details={"username": user.username},
        )


def count_users(session: Session) -> int:
    """How many users exist."""
    return int(session.scalar(select(func.count()).select_from(UserRow)) or 0)
