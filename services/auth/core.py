"""The auth service's shared state and its hot path: Authenticate, Login, Logout.

`AuthCore` owns the database, the principal cache, the revocation hub and the
last-used batcher; the admin domain modules (users, roles, keys, usage, audit)
run their transactions through it. No grpc here.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

from prometheus_client import Counter
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.auth import migrate
from services.auth.db.engine import Database
from services.auth.db.models import ApiKeyRow, SessionRow, UserRow
from services.auth.domain import audit_flood, credentials, login
from services.auth.domain.cache import PrincipalCache
from services.auth.domain.last_used import LastUsedBatcher
from services.auth.domain.lockout import LockoutPolicy
from services.auth.domain.login import AUTH_FAILURES, LoginResult
from services.auth.domain.passwords import Passwords
from services.auth.domain.principal import (
    Caller,
    Principal,
    key_principal,
    session_principal,
    utcnow,
)
from services.auth.domain.revocations import ALL_USERS, RevocationHub, Revocations, Revoked
from services.auth.settings import AuthSettings
from services.common.errors import (
    AlreadyExists,
    PermissionDenied,
    Unauthenticated,
)

log = logging.getLogger("tokenyard.auth")
CACHE_LOOKUPS = Counter(
    "tokenyard_auth_cache_lookups_total", "Principal cache lookups, by result.", ["result"]
)
T = TypeVar("T")
R = TypeVar("R", ApiKeyRow, SessionRow)


class AuthCore:
    """Database, caches and background tasks of one auth replica."""

    def __init__(
        self,
        settings: AuthSettings,
        db: Database | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.db = db or Database(settings.database_url)
        a = settings.argon2
        self.passwords = Passwords(a.time_cost, a.memory_kib, a.parallelism)
        self.peppers = settings.peppers()
        self.version = settings.key_pepper_version
        self.cache = PrincipalCache(settings.principal_cache_ttl)
        self.hub = RevocationHub(self.db, self._on_revoked, settings.revocation_poll_seconds)
        self.last_used = LastUsedBatcher(self.db, settings.last_used_flush_seconds)
        # Database lookups in flight, by digest, with the cache generation they began in.
        self._lookups: dict[str, tuple[int, asyncio.Future[Principal]]] = {}
        self.lockout = LockoutPolicy(
            settings.lockout_threshold, settings.lockout_seconds, settings.lockout_max_seconds
        )

    async def start(self) -> None:
        """Check the schema and start the background tasks."""
        await asyncio.to_thread(migrate.check_schema, self.db.engine)
        await self.hub.start()
        self.last_used.start()

    async def close(self) -> None:
        """Stop background tasks, flush last-used times, close the database."""
        await self.hub.stop()
        await self.last_used.stop()
        await asyncio.to_thread(self.db.close)

    # -- transactions ---------------------------------------------------------------

    def digest(self, credential: str) -> str:
        """Digest of `credential` under the current pepper."""
        return credentials.digest(self.peppers[self.version], credential)

    async def mutate(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(session, revocations, *args)` in a write transaction, then push revocations."""
        pending = Revocations()
        try:
            result = await self.db.write(fn, pending, *args)
        except PermissionDenied as exc:  # an escalation refused inside the transaction
            caller = next((a for a in args if isinstance(a, Caller)), None)
            if caller is not None:
                operation = getattr(fn, "__qualname__", "").replace("._", ".")
                field = exc.metadata.get("field", "")
                await self.audit_denied(
                    caller, {"operation": operation, "reason": exc.reason, "field": field}
                )
            raise
        except IntegrityError:
            # A concurrent call created the same unique name or request id first.
            raise AlreadyExists(
                "the object was created concurrently by another request; retry to see it",
                reason="CONFLICT",
            ) from None
        self.hub.publish(pending.revoked)
        return result

    def _on_revoked(self, revoked: Revoked) -> None:
        if ALL_USERS in revoked.user_ids or revoked.reset:
            self.cache.clear()
        else:
            self.cache.invalidate(revoked.credential_ids, revoked.user_ids)

    async def audit_denied(
        self,
        caller: Caller,
        details: dict[str, str],
        object_type: str = "",
        object_id: str = "",
    ) -> None:
        """Count (and, within the flood cap, write) one permission.denied event."""
        await self.db.write(
            lambda s: audit_flood.record_throttled(
                s,
                "permission.denied",
                user=caller.principal.user_id,
                peer=caller.peer,
                now=self.clock(),
                rows_per_minute=self.settings.audit_rows_per_minute,
                caller=caller,
                object_type=object_type,
                object_id=object_id,
                details=details,
            )
        )

    async def deny(
        self,
        caller: Caller,
        permission: str,
        action: str,
        object_type: str = "",
        object_id: str = "",
    ) -> PermissionDenied:
        """Audit a refused call and return the error to raise."""
        await self.audit_denied(
            caller,
            {"rpc": action, "permission": permission},
            object_type=object_type,
            object_id=object_id,
        )
        return PermissionDenied(
            f"this call needs the {permission!r} permission",
            reason="MISSING_PERMISSION",
            metadata={"permission": permission},
        )

    async def require(
        self,
        caller: Caller,
        permission: str,
        action: str,
        object_type: str = "",
        object_id: str = "",
    ) -> None:
        """Refuse (and audit) unless the caller holds `permission`."""
        if not caller.principal.has(permission):
            raise await self.deny(caller, permission, action, object_type, object_id)

    # -- Authenticate -----------------------------------------------------------------

    async def authenticate(self, credential: str) -> Principal:
        """The principal behind an API key or session token, cached briefly."""
        try:
            parsed = credentials.parse(credential)
            digest = self.digest(parsed.text)
            principal = self.cache.get(digest)
            CACHE_LOOKUPS.labels("hit" if principal else "miss").inc()
            if principal is None:
                principal = await self._lookup_once(digest, parsed)
        except Unauthenticated as exc:
            AUTH_FAILURES.labels(exc.reason).inc()
            raise
        if principal.credential_type != "session":
            self.last_used.touch(principal.credential_id)
        return principal

    async def _lookup_once(self, digest: str, parsed: credentials.Parsed) -> Principal:
        """One database lookup per digest at a time: concurrent callers share it."""
        generation = self.cache.generation
        pending = self._lookups.get(digest)
        # A lookup that began before a revocation may have read the key still valid:
        # a caller arriving after the revocation never joins it, it reads again.
        if pending is not None and pending[0] == generation:
            return await asyncio.shield(pending[1])
        task = asyncio.ensure_future(self._lookup(digest, parsed))
        self._lookups[digest] = (generation, task)

        def settled(_: object) -> None:
            if self._lookups.get(digest, (0, None))[1] is task:
                del self._lookups[digest]

        task.add_done_callback(settled)
        return await asyncio.shield(task)

    async def _lookup(self, digest: str, parsed: credentials.Parsed) -> Principal:
        generation = self.cache.generation
        principal, stale_version = await self.db.read(self._resolve, parsed)
        if stale_version:
            await self.db.write(self._rehash, parsed, principal)
        self.cache.put(digest, principal, generation)
        return principal

    async def caller(self, credential: str, peer: str) -> Caller:
        """Authenticate the caller of an RPC."""
        return Caller(await self.authenticate(credential), peer)

    def _candidates(self, text: str) -> dict[int, str]:
        return {v: credentials.digest(p, text) for v, p in self.peppers.items()}

    def _resolve(self, session: Session, parsed: credentials.Parsed) -> tuple[Principal, bool]:
        digests = self._candidates(parsed.text)
        now = utcnow()
        wanted = list(digests.values())
        if parsed.prefix == credentials.SESSION_PREFIX:
            sessions = session.scalars(select(SessionRow).where(SessionRow.digest.in_(wanted)))
            srow = self._match(sessions, digests)
            if srow is None or srow.revoked_at is not None or srow.expires_at <= now:
                raise Unauthenticated(reason="UNKNOWN_CREDENTIAL")
            user = self._active_user(session, srow.user_id)
            return session_principal(session, srow, user, now), srow.hash_version != self.version
        keys = session.scalars(select(ApiKeyRow).where(ApiKeyRow.digest.in_(wanted)))
        key = self._match(keys, digests)
        if key is None or key.revoked_at is not None or key.deleted_at is not None:
            raise Unauthenticated(reason="UNKNOWN_CREDENTIAL")
        if key.expires_at is not None and key.expires_at <= now:
            raise Unauthenticated(reason="EXPIRED_CREDENTIAL")
        user = self._active_user(session, key.user_id)
        kind = (
            credentials.SERVICE_KEY_PREFIX if user.service_account else credentials.USER_KEY_PREFIX
        )
        if parsed.prefix != kind:
            raise Unauthenticated(reason="UNKNOWN_CREDENTIAL")
        return key_principal(session, key, user, now), key.hash_version != self.version

    @staticmethod
    def _match(rows: Iterable[R], digests: dict[int, str]) -> R | None:
        """The row whose digest equals ours under its own pepper version (constant time)."""
        for row in rows:
            if hmac.compare_digest(row.digest, digests.get(row.hash_version, "")):
                return row
        return None

    @staticmethod
    def _active_user(session: Session, user_id: str) -> UserRow:
        user = session.get(UserRow, user_id)
        if user is None or user.disabled:
            raise Unauthenticated(reason="UNKNOWN_CREDENTIAL")
        return user

    def _rehash(self, session: Session, parsed: credentials.Parsed, principal: Principal) -> None:
        """Move a credential found under an old pepper to the current one."""
        model = SessionRow if parsed.prefix == credentials.SESSION_PREFIX else ApiKeyRow
        session.execute(
            update(model)
            .where(model.id == principal.credential_id)
            .values(digest=self.digest(parsed.text), hash_version=self.version)
        )

    # -- Login / Logout (domain/login.py) ------------------------------------------

    async def login(self, username: str, password: str, peer: str) -> LoginResult:
        """Check a password; lock out after repeated failures; open a session."""
        return await login.login(self, username, password, peer)

    async def logout(self, caller: Caller) -> None:
        """End the caller's session."""
        await login.logout(self, caller)
