"""The router's view of auth: Authenticate with a cache, single flight, revocations.

Principals are cached for the time auth grants (`cache_ttl`, capped by the
router's own maximum and the credential's expiry); rejections for a short
while. Concurrent requests with the same uncached credential share one call.
A `WatchRevocations` stream drops revoked credentials at once; on (re)connect
auth's first message has `reset=true` and the whole cache goes, because
revocations sent while disconnected may have been missed.

Fail closed: when auth cannot be reached, a cached principal keeps working until
its cache time ends and every other credential gets UNAVAILABLE. An auth error
is never taken for success. Cache keys are digests: secrets are not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from cachetools import TLRUCache, TTLCache
from tokenyard.auth.v1 import auth_service_pb2 as auth
from tokenyard.auth.v1 import auth_service_pb2_grpc as auth_grpc
from tokenyard.auth.v1 import resources_pb2 as res

from services.common.errors import Unauthenticated, Unavailable
from services.router import metrics

log = logging.getLogger("tokenyard.router.auth")

MAX_CREDENTIAL_CHARS = 512
MAX_CACHED = 100_000  # principals (and, apart, rejected credentials) kept at most
_CACHE_HIT = metrics.AUTH_CACHE.labels("hit")
_CACHE_NEGATIVE_HIT = metrics.AUTH_CACHE.labels("negative_hit")
_CACHE_MISS = metrics.AUTH_CACHE.labels("miss")


@dataclass(eq=False)
class CachedPrincipal:
    """An authenticated principal as the router uses it, with local usage since fetch."""

    principal: res.Principal
    expires: float
    permissions: frozenset[str]
    models: tuple[str, ...]
    key: bytes = b""

    @property
    def credential_id(self) -> str:
        """Id of the key or session (never the secret)."""
        return self.principal.credential_id

    def may(self, permission: str) -> bool:
        """Whether the principal holds `permission` (or admin)."""
        return permission in self.permissions or "admin" in self.permissions

    def may_use(self, model: str) -> bool:
        """Whether `model` matches one of the allowed patterns ("*", "name-*", exact)."""
        return any(model_matches(p, model) for p in self.models)


def model_matches(pattern: str, model: str) -> bool:
    """ "*" matches any model, "prefix*" a prefix, anything else exactly."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return model.startswith(pattern[:-1])
    return pattern == model


def bearer_credential(header: str | None) -> str:
    """The credential of an `authorization: Bearer <credential>` header, or Unauthenticated."""
    if not header:
        raise Unauthenticated()
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or len(credential) > MAX_CREDENTIAL_CHARS:
        raise Unauthenticated()
    if not credential.isascii() or not credential.isprintable():
        raise Unauthenticated()
    return credential


@dataclass
class _Index:
    by_credential: dict[str, set[bytes]] = field(default_factory=dict)
    by_user: dict[str, set[bytes]] = field(default_factory=dict)


class _Principals(TLRUCache[bytes, CachedPrincipal]):
    """Cached principals, each until its own `expires`; the least recently used makes
    room when full. `on_evict` hears of every entry the cache drops by itself."""

    def __init__(
        self,
        maxsize: int,
        timer: Callable[[], float],
        on_evict: Callable[[CachedPrincipal], None],
    ) -> None:
        super().__init__(maxsize, lambda _key, entry, _now: entry.expires, timer=timer)
        self._on_evict = on_evict

    def expire(self, time: float | None = None) -> list[tuple[bytes, CachedPrincipal]]:
        expired = list(super().expire(time))
        for _, entry in expired:
            self._on_evict(entry)
        return expired

    def popitem(self) -> tuple[bytes, CachedPrincipal]:
        key, entry = super().popitem()
        self._on_evict(entry)
        return key, entry


class AuthClient:
    """Authenticates credentials through auth, caching answers for the router."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        default_ttl: float = 5.0,
        max_ttl: float = 60.0,
        failure_ttl: float = 2.0,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_cached: int = MAX_CACHED,
    ) -> None:
        self._stub = auth_grpc.AuthServiceStub(channel)
        self.default_ttl, self.max_ttl = default_ttl, max_ttl
        self.failure_ttl, self.timeout = failure_ttl, timeout
        self._clock = clock
        self._cache = _Principals(max_cached, clock, self._unindex)
        # Rejected credentials, for failure_ttl: a bad key is not re-checked per call.
        self._failures: TTLCache[bytes, bool] = TTLCache(max_cached, failure_ttl, timer=clock)
        # Calls to auth in flight, by key, with the revocation epoch they began in.
        self._inflight: dict[bytes, tuple[int, asyncio.Future[CachedPrincipal]]] = {}
        self._index = _Index()
        self._epoch = 0
        self._watch: asyncio.Task[None] | None = None
        self.revocations_connected = asyncio.Event()

    # -- lookups -----------------------------------------------------------------

    async def authenticate(self, credential: str) -> CachedPrincipal:
        """The principal of `credential`; Unauthenticated, or Unavailable when auth is down."""
        key = hashlib.sha256(credential.encode()).digest()
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and entry.expires > now:
            _CACHE_HIT.inc()
            return entry
        if key in self._failures:
            _CACHE_NEGATIVE_HIT.inc()
            raise Unauthenticated()
        _CACHE_MISS.inc()
        flight = self._inflight.get(key)
        # A call that began before the last revocation may carry a revoked answer:
        # a request arriving after it is applied never joins it, it asks again.
        if flight is None or flight[0] != self._epoch:
            # A task, so one waiter's cancellation does not fail the others.
            pending = asyncio.ensure_future(self._fetch(key, credential))
            flight = (self._epoch, pending)
            self._inflight[key] = flight
            pending.add_done_callback(lambda task: self._settled(key, task))
        return await asyncio.shield(flight[1])

    def _settled(self, key: bytes, task: asyncio.Future[CachedPrincipal]) -> None:
        flight = self._inflight.get(key)
        if flight is not None and flight[1] is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, even when every waiter went away

    async def _fetch(self, key: bytes, credential: str) -> CachedPrincipal:
        epoch = self._epoch
        try:
            reply = await self._stub.Authenticate(
                auth.AuthenticateRequest(credential=credential), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                self._failures[key] = True
                raise Unauthenticated() from None
            log.warning("auth unreachable", extra={"code": code.name})
            raise Unavailable("authentication service unavailable", retry_after=1.0) from None
        principal = reply.principal
        if not principal.credential_id:
            log.error("auth returned a principal without a credential id")
            raise Unavailable("authentication service unavailable", retry_after=1.0)
        now = self._clock()
        ttl = self.default_ttl
        if reply.HasField("cache_ttl"):
            ttl = reply.cache_ttl.ToNanoseconds() / 1e9
        ttl = max(0.0, min(ttl, self.max_ttl))
        if principal.HasField("expire_time"):
            ttl = min(ttl, principal.expire_time.ToNanoseconds() / 1e9 - time.time())
        entry = CachedPrincipal(
            principal=principal,
            expires=now + ttl,
            permissions=frozenset(principal.permissions),
            models=tuple(principal.allowed_models),
            key=key,
        )
        # A revocation that arrived while this call was in flight may concern it:
        # use the answer for this request only.
        if ttl > 0 and epoch == self._epoch:
            self._store(key, entry)
        return entry

    def _store(self, key: bytes, entry: CachedPrincipal) -> None:
        old = self._cache.get(key)
        if old is not None:
            self._unindex(old)
        self._cache[key] = entry
        self._failures.pop(key, None)
        self._index.by_credential.setdefault(entry.credential_id, set()).add(key)
        self._index.by_user.setdefault(entry.principal.user_id, set()).add(key)

    def _unindex(self, entry: CachedPrincipal) -> None:
        for index, name in (
            (self._index.by_credential, entry.credential_id),
            (self._index.by_user, entry.principal.user_id),
        ):
            keys = index.get(name)
            if keys is not None:
                keys.discard(entry.key)
                if not keys:
                    del index[name]

    def _drop(self, key: bytes) -> None:
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._unindex(entry)

    # -- revocations -------------------------------------------------------------

    def apply_revocation(self, message: auth.WatchRevocationsResponse) -> None:
        """Drop what a revocation message names (everything on reset)."""
        self._epoch += 1
        if message.reset:
            self._cache.clear()
            self._index = _Index()
        for credential_id in message.credential_ids:
            for key in list(self._index.by_credential.get(credential_id, ())):
                self._drop(key)
        for user_id in message.user_ids:
            for key in list(self._index.by_user.get(user_id, ())):
                self._drop(key)
        # A negative answer may be stale too (a key re-enabled): forget them.
        self._failures.clear()

    def start(self) -> None:
        """Start following auth's revocation stream (reconnecting with backoff)."""
        if self._watch is None:
            self._watch = asyncio.create_task(self._follow_revocations(), name="revocations")

    async def _follow_revocations(self) -> None:
        backoff = 0.1
        while True:
            call = self._stub.WatchRevocations(auth.WatchRevocationsRequest())
            try:
                async for message in call:
                    self.apply_revocation(message)
                    self.revocations_connected.set()
                    backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                log.debug("revocation stream ended", extra={"code": exc.code().name})
            finally:
                call.cancel()
                self.revocations_connected.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        """Stop following revocations."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
