"""First admin and the local demo user, without a running server.

`bootstrap_admin` backs `tokenyard auth bootstrap`; `ensure_demo` is what the
local-stack launcher calls: it migrates, makes sure an admin and a demo user
(role "demo": generate + models.list + keys.manage_own) exist, and returns a
working demo API key, reusing the one in `key_path` when it still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.auth import migrate
from services.auth.core import AuthCore
from services.auth.db.models import RoleRow, UserRow
from services.auth.domain.keys import Keys, KeySpec
from services.auth.domain.permissions import ADMIN, PERMISSIONS, Limits
from services.auth.domain.principal import USER_KEY, Caller, Principal
from services.auth.domain.roles import Roles, RoleSpec
from services.auth.domain.users import NewUser, Users, admin_count
from services.auth.settings import AuthSettings
from services.common.errors import FailedPrecondition, Unauthenticated

SYSTEM = Caller(
    Principal(
        user_id="",
        username="bootstrap",
        credential_id="bootstrap",
        credential_type=USER_KEY,
        permissions=PERMISSIONS,
        allowed_models=("*",),
        limits=Limits(),
        expire_time=None,
    ),
    peer="local",
)
DEMO_ROLE = RoleSpec(
    "demo", "Local demo user", ("generate", "keys.manage_own", "models.list"), ("*",)
)
ADMIN_ROLE = RoleSpec("admin", "Everything", (ADMIN,), ("*",))


async def _ensure_role(core: AuthCore, spec: RoleSpec) -> None:
    exists = await core.db.read(lambda s: s.get(RoleRow, spec.name) is not None)
    if not exists:
        await Roles(core).create(SYSTEM, spec, "")


async def _user(core: AuthCore, username: str) -> UserRow | None:
    def find(session: Session) -> UserRow | None:
        return session.scalar(select(UserRow).where(UserRow.username == username))

    return await core.db.read(find)


async def _create_admin(core: AuthCore, username: str, password: str) -> str:
    await _ensure_role(core, ADMIN_ROLE)
    user = await Users(core).create(
        SYSTEM, NewUser(username, password, "Administrator", ("admin",), False, "")
    )
    made = await Keys(core).create(SYSTEM, user.id, KeySpec(name="bootstrap"), "")
    return made.secret


async def bootstrap_admin(settings: AuthSettings, username: str, password: str) -> str:
    """Create the first admin and return one admin API key; refuses if an admin exists."""
    core = AuthCore(settings)
    try:
        await asyncio.to_thread(migrate.upgrade, core.db.engine)
        if await core.db.read(admin_count):
            raise FailedPrecondition("an admin exists already; bootstrap runs only once")
        return await _create_admin(core, username, password)
    finally:
        await core.close()


async def ensure_demo_async(settings: AuthSettings, existing: str | None = None) -> str:
    """Migrate, ensure an admin and the demo user; return `existing` if it still works
    as the demo user's key, else a new demo key."""
    core = AuthCore(settings)
    try:
        await asyncio.to_thread(migrate.upgrade, core.db.engine)
        if existing:
            with contextlib.suppress(Unauthenticated):
                principal = await core.authenticate(existing)
                if principal.username == "demo":
                    return existing
        if not await core.db.read(admin_count):
            await _create_admin(core, "admin", secrets.token_urlsafe(24))
        await _ensure_role(core, DEMO_ROLE)
        demo = await _user(core, "demo")
        if demo is None:
            new = NewUser("demo", "", "Demo user", ("demo",), True, "")
            demo = await Users(core).create(SYSTEM, new)
        made = await Keys(core).create(SYSTEM, demo.id, KeySpec(name="demo"), "")
        return made.secret
    finally:
        await core.close()


def ensure_demo(settings: AuthSettings, key_path: Path | None = None) -> str:
    """Idempotent demo setup for the launcher: reuses the key in `key_path` while it
    works, otherwise writes a new one there (mode 0600). Returns the key."""
    existing = None
    if key_path is not None and key_path.is_file():
        existing = key_path.read_text().strip()
    key = asyncio.run(ensure_demo_async(settings, existing))
    if key_path is not None and key != existing:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
    return key
