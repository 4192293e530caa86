"""The response cache: exact repeats of deterministic requests answered without a worker.

A request is cacheable when the caller's limits enable it (`response_cache`), its
`cache` mode is not BYPASS, and it is deterministic (greedy or seeded: see
`services.common.requests.deterministic`). Its key is the SHA-256 of the scope
(the user: one tenant never reads another's entry, so another user's identical
request is simply a miss and runs on a worker), the model's name, the worker's
model revision (a content hash of its weights; different weights never share an
entry) and the canonical request: the request as serialized deterministically,
minus the fields that do not change the answer (request_id, end_user,
affinity_key, priority, cache). Fields added to the request later are in the key
without a change here. No secret is in the key or the entry.

An entry is the stream's messages as the client received them, so a hit replays
the same chunking, `index` and finish reasons; only the last message's usage
says `cached`. Only complete generations that ran on one worker are stored.

Two stores behind one interface: Redis (shared by router replicas: a request
cached through one router hits on every router) when the router has a Redis URL,
else an in-process LRU bounded in bytes. Entries expire after the TTL. When Redis
is unreachable the cache is a miss and nothing is stored: generation goes on.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cachetools import TLRUCache
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.requests import Sampling, deterministic
from services.router import metrics
from services.router.relay import StreamState
from services.router.writer import Emit

log = logging.getLogger("tokenyard.router.cache")

# Request fields that do not change what is generated: left out of the key.
_NOT_IN_KEY = ("request_id", "end_user", "affinity_key", "priority", "cache")
_FORMAT = b"ty-rc1"  # entry format: this prefix, then (u32 length, message bytes)*
_LEN = struct.Struct("<I")


def enabled_for(limits: res.Limits) -> bool:
    """The caller's effective limits enable the cache (off unless set true; role and
    key limits are combined before they reach the router, so false anywhere wins)."""
    return limits.HasField("response_cache") and limits.response_cache


def canonical_request(request: gen.StreamGenerateRequest) -> bytes:
    """The request's bytes as far as they decide the answer (unknown fields included)."""
    copy = gen.StreamGenerateRequest()
    copy.CopyFrom(request)
    fields = copy.DESCRIPTOR.fields_by_name
    for name in _NOT_IN_KEY:
        if name in fields:
            copy.ClearField(name)
    if copy.n == 1:
        copy.n = 0  # 0 and 1 both mean one sample
    return copy.SerializeToString(deterministic=True)


def cache_key(scope: str, model: str, revision: str, canonical: bytes) -> str:
    """The hex SHA-256 naming one entry."""
    digest = hashlib.sha256()
    for part in (scope.encode(), model.encode(), revision.encode()):
        digest.update(_LEN.pack(len(part)))
        digest.update(part)
    digest.update(canonical)
    return digest.hexdigest()


def encode_entry(messages: Iterable[bytes]) -> bytes:
    """One entry's bytes: the recorded messages, each with its length."""
    parts = [_FORMAT]
    for message in messages:
        parts.append(_LEN.pack(len(message)))
        parts.append(message)
    return b"".join(parts)


def decode_entry(raw: bytes) -> list[bytes] | None:
    """The messages of an entry; None when it is not one this version wrote."""
    if not raw.startswith(_FORMAT):
        return None
    out: list[bytes] = []
    at = len(_FORMAT)
    while at < len(raw):
        if at + _LEN.size > len(raw):
            return None
        (size,) = _LEN.unpack_from(raw, at)
        at += _LEN.size
        if at + size > len(raw):
            return None
        out.append(raw[at : at + size])
        at += size
    return out or None


class CacheStore(Protocol):
    """Where entries live: get by key (None when absent or expired), put with a TTL."""

    async def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    async def put(self, key: str, value: bytes, ttl: float) -> None: ...

    async def close(self) -> None: ...


class LocalStore:
    """An in-process LRU bounded in bytes; entries expire after their TTL (`clock`)."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._cache: TLRUCache[str, tuple[bytes, float]] = TLRUCache(
            maxsize=max_bytes,
            ttu=lambda _key, value, now: now + value[1],
            timer=clock,
            getsizeof=lambda value: len(value[0]),
        )

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            value = self._cache.get(key)
            out.append(None if value is None else value[0])
        return out

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        if len(value) <= self._cache.maxsize:
            self._cache[key] = (value, ttl)

    async def close(self) -> None:
        self._cache.clear()


class RedisStore:
    """Entries in Redis under `<prefix><key>` with a TTL: shared by every router."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.prefix = prefix
        self._down = False

    def _failed(self, exc: Exception) -> None:
        metrics.RESPONSE_CACHE.labels("error").inc()
        if not self._down:
            self._down = True
            log.warning("response cache: redis unreachable; serving without the cache: %s", exc)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        from redis.exceptions import RedisError

        try:
            values = await self._redis.mget([self.prefix + k for k in keys])
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return [None] * len(keys)
        self._down = False
        return [v if isinstance(v, bytes) else None for v in values]

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        from redis.exceptions import RedisError

        try:
            await self._redis.set(self.prefix + key, value, px=max(1, int(ttl * 1000)))
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def close(self) -> None:
        await self._redis.aclose()


@dataclass
class Lookup:
    """One cacheable request: its keys (one per model revision being served)."""

    scope: str
    model: str
    canonical: bytes
    read: bool  # False for REFRESH: generate anew, then store
    keys: dict[str, str] = field(default_factory=dict)  # revision → key

    def key_for(self, revision: str) -> str:
        """The key of this request's answer by weights of `revision`."""
        key = self.keys.get(revision)
        if key is None:
            key = self.keys[revision] = cache_key(self.scope, self.model, revision, self.canonical)
        return key


class ResponseCache:
    """Looks up, replays and stores complete answers of deterministic requests."""

    def __init__(self, store: CacheStore, *, ttl: float, max_entry_bytes: int) -> None:
        self.store, self.ttl, self.max_entry_bytes = store, ttl, max_entry_bytes

    def plan(
        self,
        *,
        limits: res.Limits,
        user_id: str,
        request: gen.StreamGenerateRequest,
        sampling: Sampling,
        mode: int,
    ) -> Lookup | None:
        """The request's lookup, or None when it must not touch the cache."""
        if mode == gen.CACHE_MODE_BYPASS or not enabled_for(limits):
            return None
        if not deterministic(sampling):
            return None
        return Lookup(
            scope=f"user:{user_id}",
            model=request.model,
            canonical=canonical_request(request),
            read=mode != gen.CACHE_MODE_REFRESH,
        )

    async def find(self, lookup: Lookup, revisions: Iterable[str]) -> list[bytes] | None:
        """The recorded messages of an answer by any of `revisions`, or None."""
        keys = [lookup.key_for(r) for r in sorted(set(revisions)) if r]
        if not keys:
            return None
        for raw in await self.store.get_many(keys):
            messages = decode_entry(raw) if raw is not None else None
            if messages is not None:
                metrics.RESPONSE_CACHE.labels("hit").inc()
                return messages
        metrics.RESPONSE_CACHE.labels("miss").inc()
        return None

    async def store_answer(self, lookup: Lookup, revision: str, messages: list[bytes]) -> None:
        """Keep a complete answer generated by weights of `revision`."""
        if not revision or not messages:
            return
        entry = encode_entry(_without_request_id(messages))
        if len(entry) > self.max_entry_bytes:
            metrics.RESPONSE_CACHE.labels("skip_too_large").inc()
            return
        await self.store.put(lookup.key_for(revision), entry, self.ttl)
        metrics.RESPONSE_CACHE.labels("store").inc()

    async def close(self) -> None:
        """Release the store's connections."""
        await self.store.close()


def _without_request_id(messages: list[bytes]) -> list[bytes]:
    out = []
    for raw in messages:
        message = gen.StreamGenerateResponse.FromString(raw)
        message.ClearField("request_id")
        out.append(message.SerializeToString())
    return out


def replayed(
    messages: list[bytes], request_id: str
) -> list[tuple[bytes | None, gen.StreamGenerateResponse]]:
    """The recorded messages for this request, each as (bytes to send or None, message):
    its request id set, and `cached` on the last usage. Stored messages carry no request
    id, so the id is appended as one more field (protobuf keeps the last occurrence) and
    all but the usage message go out without being serialized again."""
    suffix = _request_id_field(request_id)
    out: list[tuple[bytes | None, gen.StreamGenerateResponse]] = []
    for raw in messages:
        message = gen.StreamGenerateResponse.FromString(raw)
        if message.HasField("usage"):
            message.request_id = request_id
            message.usage.cached = True
            message.usage.cached_completion_tokens = message.usage.completion_tokens
            out.append((None, message))
        else:
            out.append((raw + suffix, message))
    return out


def _request_id_field(request_id: str) -> bytes:
    """StreamGenerateResponse.request_id (field 1, length-delimited) as wire bytes."""
    if not request_id:
        return b""
    value = request_id.encode()
    return b"\x0a" + _varint(len(value)) + value


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


async def replay(messages: list[bytes], request_id: str, emit: Emit, state: StreamState) -> None:
    """Emit a stored answer as recorded, counting it in `state` as cached tokens."""
    for raw, message in replayed(messages, request_id):
        state.tokens.extend(message.token_ids)
        if message.finish_reason:
            state.samples_ended += 1
            state.finish_reason = message.finish_reason
        if message.HasField("usage"):
            state.prompt_tokens = message.usage.prompt_tokens
        state.cached_tokens = len(state.tokens)
        await emit(message if raw is None else raw)


def recording(emit: Emit, recorded: list[bytes]) -> Emit:
    """`emit`, keeping each message as the client received it (to store the answer)."""

    async def record(payload: bytes | gen.StreamGenerateResponse) -> None:
        recorded.append(payload if isinstance(payload, bytes) else payload.SerializeToString())
        await emit(payload)

    return record


def complete(state: StreamState, samples: int) -> bool:
    """Whether a stream is a whole answer worth storing: every sample ended by the model
    (not cancelled), all of it from one worker that reported its revision."""
    return (
        state.samples_ended >= samples
        and state.finish_reason not in (0, gen.FINISH_REASON_CANCELLED)
        and not state.resumed
        and bool(state.revision)
    )
