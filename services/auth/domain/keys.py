"""ApiKeyService's domain: keys shown once, narrowed by owner and creator."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, tuple_
from sqlalchemy.orm import Session

from services.auth.db.models import ApiKeyRow, UserRow
from services.auth.domain import audit, credentials, grants, pages, validation
from services.auth.domain.key_scope import KeySpec, narrowed
from services.auth.domain.permissions import Limits
from services.auth.domain.principal import Caller, utcnow
from services.auth.domain.revocations import Revocations
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from services.auth.core import AuthCore

__all__ = ["KeySpec", "Keys", "NewKey"]

KEY_MASK = ("name", "permissions", "allowed_models", "limits", "expire_time")
DEFAULT_GRACE = timedelta(hours=24)


@dataclass(frozen=True)
class NewKey:
    """A created key and its secret (empty on an idempotent repeat)."""

    key: ApiKeyRow
    secret: str
    previous: ApiKeyRow | None = None


def not_found() -> NotFound:
    """One answer for a missing key and someone else's (no existence oracle)."""
    return NotFound("api key not found", reason="KEY_NOT_FOUND")


def check_expiry(when: datetime | None, field: str) -> None:
    """An expiry, when given, lies in the future."""
    if when is not None and when <= utcnow():
        raise InvalidArgument(field, "must be in the future")


class Keys:
    """API key management over an AuthCore."""

    def __init__(self, core: AuthCore) -> None:
        self.core = core

    async def _may_manage(self, caller: Caller, owner_id: str, action: str) -> None:
        """keys.admin for anyone's keys; keys.manage_own for one's own."""
        p = caller.principal
        if owner_id == p.user_id and (p.has("keys.manage_own") or p.has("keys.admin")):
            return
        needed = "keys.manage_own" if owner_id == p.user_id else "keys.admin"
        await self.core.require(caller, needed, action, "user", owner_id[:64])

    async def create(self, caller: Caller, owner_id: str, spec: KeySpec, request_id: str) -> NewKey:
        """Create a key; the secret is returned here and never again."""
        owner_id = owner_id or caller.principal.user_id
        await self._may_manage(caller, owner_id, "CreateApiKey")
        validation.object_id(owner_id, "user_id")
        validation.text(spec.name, "name", 100, required=True)
        validation.request_id(request_id)
        check_expiry(spec.expire_time, "expire_time")
        return await self.core.mutate(self._create, caller, owner_id, spec, request_id)

    def _create(
        self,
        session: Session,
        _: Revocations,
        caller: Caller,
        owner_id: str,
        spec: KeySpec,
        request_id: str,
    ) -> NewKey:
        owner = session.get(UserRow, owner_id)
        if owner is None:
            raise NotFound("user not found", reason="USER_NOT_FOUND")
        if request_id:
            earlier = session.scalar(
                select(ApiKeyRow).where(
                    ApiKeyRow.user_id == owner_id, ApiKeyRow.request_id == request_id
                )
            )
            if earlier is not None:
                return NewKey(earlier, "")
        stored = narrowed(caller, owner, spec, "")
        key, secret = self._insert(session, caller, owner, stored, request_id, None)
        audit.record(
            session,
            "key.create",
            caller=caller,
            object_type="api_key",
            object_id=key.id,
            details={"owner": owner.id, "name": key.name},
        )
        return NewKey(key, secret)

    def _insert(  # noqa: PLR0917 - the new key's fields
        self,
        session: Session,
        caller: Caller,
        owner: UserRow,
        spec: KeySpec,
        request_id: str,
        rotated_from: str | None,
    ) -> tuple[ApiKeyRow, str]:
        prefix = (
            credentials.SERVICE_KEY_PREFIX if owner.service_account else credentials.USER_KEY_PREFIX
        )
        secret = credentials.generate(prefix)
        # Who really made it: the caller when it is not the owner; a key the owner's key
        # made inherits that key's maker (a keys.admin holder's minted key stays theirs).
        p = caller.principal
        maker = p.user_id if p.user_id != owner.id else p.minted_by
        key = ApiKeyRow(
            id=validation.new_id(),
            user_id=owner.id,
            name=spec.name,
            hint=credentials.hint(secret),
            digest=self.core.digest(secret),
            hash_version=self.core.version,
            permissions=list(spec.permissions),
            allowed_models=list(spec.allowed_models),
            limits=spec.limits.to_json(),
            expires_at=spec.expire_time,
            created_at=utcnow(),
            rotated_from_id=rotated_from,
            request_id=request_id or None,
            created_by=maker or None,
        )
        session.add(key)
        session.flush()
        return key, secret

    async def _load(self, caller: Caller, key_id: str, action: str) -> ApiKeyRow:
        """A live key the caller may manage; NOT_FOUND for missing and foreign alike."""
        p = caller.principal
        if not (p.has("keys.manage_own") or p.has("keys.admin")):
            await self.core.require(caller, "keys.manage_own", action, "api_key", key_id[:64])
        kid = validation.object_id(key_id, "key_id")
        key: ApiKeyRow | None = await self.core.db.read(lambda s: s.get(ApiKeyRow, kid))
        if key is None or key.deleted_at is not None:
            raise not_found()
        if key.user_id != p.user_id and not p.has("keys.admin"):
            raise not_found()
        return key

    async def get(self, caller: Caller, key_id: str) -> ApiKeyRow:
        """One key (never its secret)."""
        return await self._load(caller, key_id, "GetApiKey")

    async def list_page(
        self, caller: Caller, owner_id: str, size: int, token: str, show_inactive: bool
    ) -> tuple[list[ApiKeyRow], str]:
        """A page of one user's keys, newest first."""
        owner_id = owner_id or caller.principal.user_id
        await self._may_manage(caller, owner_id, "ListApiKeys")
        validation.object_id(owner_id, "user_id")
        limit = pages.page_size(size)
        filters = ["keys", owner_id, show_inactive]
        after = pages.decode(token, filters, arity=2)

        def query(session: Session) -> list[ApiKeyRow] | None:
            if session.get(UserRow, owner_id) is None:
                return None
            stmt = (
                select(ApiKeyRow)
                .where(ApiKeyRow.user_id == owner_id, ApiKeyRow.deleted_at.is_(None))
                .order_by(ApiKeyRow.created_at.desc(), ApiKeyRow.id.desc())
                .limit(limit + 1)
            )
            if not show_inactive:
                now = utcnow()
                stmt = stmt.where(
                    ApiKeyRow.revoked_at.is_(None),
                    or_(ApiKeyRow.expires_at.is_(None), ApiKeyRow.expires_at > now),
                )
            if after is not None:
                when = datetime.fromisoformat(str(after[0]))
                stmt = stmt.where(
                    tuple_(ApiKeyRow.created_at, ApiKeyRow.id) < tuple_(when, str(after[1]))
                )
            return list(session.scalars(stmt))

        try:
            rows = await self.core.db.read(query)
        except ValueError:
            raise InvalidArgument("page_token", "malformed page token") from None
        if rows is None:
            raise NotFound("user not found", reason="USER_NOT_FOUND")
        more = len(rows) > limit
        rows = rows[:limit]
        last = rows[-1] if rows else None
        token = (
            pages.encode([last.created_at.isoformat(), last.id], filters) if more and last else ""
        )
        return rows, token

    async def update(
        self, caller: Caller, key_id: str, spec: KeySpec, paths: list[str]
    ) -> ApiKeyRow:
        """Change the masked fields (never beyond owner and caller)."""
        key = await self._load(caller, key_id, "UpdateApiKey")
        masked = grants.mask_paths(paths, KEY_MASK)
        if "name" in masked:
            validation.text(spec.name, "api_key.name", 100, required=True)
        if "expire_time" in masked:
            check_expiry(spec.expire_time, "api_key.expire_time")
        return await self.core.mutate(self._update, caller, key.id, spec, masked)

    @staticmethod
    def _update(  # noqa: PLR0917 - called positionally through core.mutate
        session: Session,
        pending: Revocations,
        caller: Caller,
        key_id: str,
        spec: KeySpec,
        paths: list[str],
    ) -> ApiKeyRow:
        key = session.get(ApiKeyRow, key_id)
        owner = session.get(UserRow, key.user_id) if key else None
        if key is None or owner is None:
            raise not_found()
        current = KeySpec(
            key.name,
            tuple(key.permissions),
            tuple(key.allowed_models),
            Limits.from_json(key.limits),
            key.expires_at,
        )
        merged = KeySpec(
            spec.name if "name" in paths else current.name,
            spec.permissions if "permissions" in paths else current.permissions,
            spec.allowed_models if "allowed_models" in paths else current.allowed_models,
            spec.limits if "limits" in paths else current.limits,
            spec.expire_time if "expire_time" in paths else current.expire_time,
        )
        stored = narrowed(caller, owner, merged, "api_key.")
        key.name, key.expires_at = stored.name, stored.expire_time
        key.permissions, key.allowed_models = list(stored.permissions), list(stored.allowed_models)
        key.limits = stored.limits.to_json()
        pending.add(session, credential_ids=[key.id])
        audit.record(
            session,
            "key.update",
            caller=caller,
            object_type="api_key",
            object_id=key.id,
            details={"fields": ",".join(paths)},
        )
        return key

    async def revoke(self, caller: Caller, key_id: str, delete: bool = False) -> ApiKeyRow:
        """Stop a key now (and hide it from listings when deleting)."""
        key = await self._load(caller, key_id, "DeleteApiKey" if delete else "RevokeApiKey")
        return await self.core.mutate(self._revoke, caller, key.id, delete)

    @staticmethod
    def _revoke(
        session: Session, pending: Revocations, caller: Caller, key_id: str, delete: bool
    ) -> ApiKeyRow:
        key = session.get(ApiKeyRow, key_id)
        owner = session.get(UserRow, key.user_id) if key else None
        if key is None or owner is None:
            raise not_found()
        if owner.id != caller.principal.user_id:
            grants.check_target(caller.principal, owner, "key_id")
        now = utcnow()
        key.revoked_at = key.revoked_at or now
        if delete:
            key.deleted_at = now
        pending.add(session, credential_ids=[key.id])
        audit.record(
            session,
            "key.delete" if delete else "key.revoke",
            caller=caller,
            object_type="api_key",
            object_id=key.id,
            details={"owner": key.user_id},
        )
        return key

    async def rotate(
        self, caller: Caller, key_id: str, grace: timedelta | None, request_id: str
    ) -> NewKey:
        """A successor with the same settings; the old key lives on for the grace period."""
        validation.request_id(request_id)
        if grace is not None and grace < timedelta(0):
            raise InvalidArgument("grace_period", "must not be negative")
        if grace is not None and grace > timedelta(days=30):
            raise InvalidArgument("grace_period", "must be at most 30 days")
        key = await self._load(caller, key_id, "RotateApiKey")
        return await self.core.mutate(
            self._rotate, caller, key.id, DEFAULT_GRACE if grace is None else grace, request_id
        )

    def _rotate(  # noqa: PLR0917 - called positionally through core.mutate
        self,
        session: Session,
        pending: Revocations,
        caller: Caller,
        key_id: str,
        grace: timedelta,
        request_id: str,
    ) -> NewKey:
        old = session.get(ApiKeyRow, key_id)
        owner = session.get(UserRow, old.user_id) if old else None
        if old is None or owner is None:
            raise not_found()
        if request_id:
            earlier = session.scalar(
                select(ApiKeyRow).where(
                    ApiKeyRow.user_id == owner.id,
                    ApiKeyRow.request_id == request_id,
                    ApiKeyRow.rotated_from_id == old.id,
                )
            )
            if earlier is not None:
                return NewKey(earlier, "", old)
        now = utcnow()
        if old.revoked_at is not None or (old.expires_at is not None and old.expires_at <= now):
            raise FailedPrecondition(
                "a revoked or expired key cannot be rotated", reason="KEY_INACTIVE"
            )
        spec = KeySpec(
            old.name,
            tuple(old.permissions),
            tuple(old.allowed_models),
            Limits.from_json(old.limits),
            old.expires_at,
        )
        stored = narrowed(caller, owner, spec, "")
        key, secret = self._insert(session, caller, owner, stored, request_id, old.id)
        if grace <= timedelta(0):
            old.revoked_at = now
        else:
            ends = now + grace
            old.expires_at = ends if old.expires_at is None else min(old.expires_at, ends)
        pending.add(session, credential_ids=[old.id])
        audit.record(
            session,
            "key.rotate",
            caller=caller,
            object_type="api_key",
            object_id=old.id,
            details={"successor": key.id, "grace_seconds": str(int(grace.total_seconds()))},
        )
        return NewKey(key, secret, old)
