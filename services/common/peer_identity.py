"""Mutual TLS that checks who the client is, not only that the CA signed it.

Every service's certificate comes from the same internal CA, so a signature
alone would let a worker's certificate call auth's internal RPCs. A server
with a client CA therefore also requires one of its allowed peer names (by
default `router`) among the client certificate's subject alternative names,
for the same methods the service token protects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc

from services.common.errors import PermissionDenied
from services.common.interceptors import Behaviour, _rewrap, abort_with

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def peer_names(context: Any) -> set[str]:
    """The DNS and IP subject alternative names of the client's certificate."""
    auth = context.auth_context() or {}
    return {v.decode() for v in auth.get("x509_subject_alternative_name", [])}


class PeerNameInterceptor(grpc.aio.ServerInterceptor):
    """Refuses protected RPCs from a client certificate naming none of `allowed`.

    `methods` lists the full method names to protect; None protects every method
    but health and reflection.
    """

    def __init__(self, allowed: Collection[str], methods: Collection[str] | None = None) -> None:
        self._allowed = frozenset(allowed)
        self._methods = set(methods) if methods is not None else None

    def _protected(self, method: str) -> bool:
        if self._methods is not None:
            return method in self._methods
        return not method.startswith(_OPEN_PREFIXES)

    def _refusal(self) -> PermissionDenied:
        return PermissionDenied(
            f"this internal endpoint accepts only {', '.join(sorted(self._allowed))}'s "
            "client certificate",
            reason="PEER_NOT_ALLOWED",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or not self._protected(method):
            return handler

        def wrap(behaviour: Behaviour, streaming: bool) -> Behaviour:
            if streaming:

                async def checked_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                    if not peer_names(context) & self._allowed:
                        await abort_with(context, self._refusal())
                    async for item in behaviour(request, context):
                        yield item

                return checked_stream

            async def checked(request: Any, context: Any) -> Any:
                if not peer_names(context) & self._allowed:
                    await abort_with(context, self._refusal())
                return await behaviour(request, context)

            return checked

        return _rewrap(handler, wrap)  # type: ignore[no-any-return]
