"""A test-double auth service: real gRPC, keys and principals held in memory.

Serves what the router uses of tokenyard.auth.v1 (Authenticate,
WatchRevocations, RecordUsage) so the router's unit tests and benchmark run
without a database. Integration tests use the real `tokenyard auth serve`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import duration_pb2
from tokenyard.auth.v1 import auth_service_pb2 as auth
from tokenyard.auth.v1 import auth_service_pb2_grpc as auth_grpc
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.auth.v1 import usage_service_pb2 as usage
from tokenyard.auth.v1 import usage_service_pb2_grpc as usage_grpc

from services.common import errors
from services.common.config import ServerSettings
from services.common.server import GrpcServer


def principal(
    credential_id: str,
    *,
    user_id: str = "u1",
    permissions: tuple[str, ...] = ("generate", "models.list"),
    models: tuple[str, ...] = ("*",),
    limits: res.Limits | None = None,
    quota_used: int = 0,
) -> res.Principal:
    """A principal for the double's key table."""
    return res.Principal(
        user_id=user_id,
        username=f"user-{user_id}",
        credential_id=credential_id,
        credential_type=res.CREDENTIAL_TYPE_USER_KEY,
        permissions=list(permissions),
        allowed_models=list(models),
        limits=limits or res.Limits(),
        quota_used_tokens=quota_used,
    )


class FakeAuthState:
    """Keys, usage and revocation subscribers shared by the double's servicers."""

    def __init__(self, cache_ttl: float = 5.0) -> None:
        self.keys: dict[str, res.Principal] = {}
        self.cache_ttl = cache_ttl
        self.authenticate_calls = 0
        self.usage: dict[str, usage.UsageRecord] = {}
        self.subscribers: list[asyncio.Queue[auth.WatchRevocationsResponse]] = []
        self.authenticate_delay = 0.0

    def add_key(self, key: str, p: res.Principal) -> None:
        """Make `key` authenticate as `p`."""
        self.keys[key] = p

    def revoke(self, key: str) -> None:
        """Revoke `key` and push its credential id to every watching router."""
        p = self.keys.pop(key)
        msg = auth.WatchRevocationsResponse(credential_ids=[p.credential_id])
        for queue in self.subscribers:
            queue.put_nowait(msg)


class FakeAuthService(auth_grpc.AuthServiceServicer):
    """Authenticate and WatchRevocations of the double."""

    def __init__(self, state: FakeAuthState) -> None:
        self.state = state

    async def Authenticate(
        self, request: auth.AuthenticateRequest, context: Any
    ) -> auth.AuthenticateResponse:
        self.state.authenticate_calls += 1
        # Read first, answer after the delay: as a database read then the way back, so a
        # revocation during the delay is not seen by this call (the race routers guard).
        p = self.state.keys.get(request.credential)
        if self.state.authenticate_delay:
            await asyncio.sleep(self.state.authenticate_delay)
        if p is None:
            raise errors.Unauthenticated()
        ttl = duration_pb2.Duration()
        ttl.FromNanoseconds(int(self.state.cache_ttl * 1e9))
        return auth.AuthenticateResponse(principal=p, cache_ttl=ttl)

    async def WatchRevocations(
        self, request: auth.WatchRevocationsRequest, context: Any
    ) -> AsyncIterator[auth.WatchRevocationsResponse]:
        queue: asyncio.Queue[auth.WatchRevocationsResponse] = asyncio.Queue()
        self.state.subscribers.append(queue)
        try:
            yield auth.WatchRevocationsResponse(reset=True)
            while True:
                yield await queue.get()
        finally:
            self.state.subscribers.remove(queue)


class FakeUsageService(usage_grpc.UsageServiceServicer):
    """RecordUsage of the double: idempotent by request id."""

    def __init__(self, state: FakeAuthState) -> None:
        self.state = state

    async def RecordUsage(
        self, request: usage.RecordUsageRequest, context: Any
    ) -> usage.RecordUsageResponse:
        accepted = duplicates = 0
        for record in request.records:
            if record.request_id in self.state.usage:
                duplicates += 1
            else:
                self.state.usage[record.request_id] = record
                accepted += 1
        return usage.RecordUsageResponse(accepted=accepted, duplicates=duplicates)


class FakeAuth:
    """A running double on loopback; restartable on the same port."""

    def __init__(self, state: FakeAuthState | None = None, port: int = 0) -> None:
        self.state = state or FakeAuthState()
        self.port = port
        self.server: GrpcServer | None = None

    @property
    def address(self) -> str:
        """host:port to give the router."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> str:
        """Serve (again, on the same port after a stop)."""
        server = GrpcServer(ServerSettings(port=self.port, grace_period=0.5, reflection=False))
        server.add(
            auth_grpc.add_AuthServiceServicer_to_server,
            FakeAuthService(self.state),
            "tokenyard.auth.v1.AuthService",
        )
        server.add(
            usage_grpc.add_UsageServiceServicer_to_server,
            FakeUsageService(self.state),
            "tokenyard.auth.v1.UsageService",
        )
        self.port = await server.start()
        await server.set_serving(True)
        self.server = server
        return self.address

    async def stop(self) -> None:
        """Stop serving; open streams end."""
        if self.server is not None:
            await self.server.stop(0)
            self.server = None


async def _main(port: int, keys: list[str], cache_ttl: float, response_cache: bool) -> None:
    state = FakeAuthState(cache_ttl=cache_ttl)
    limits = res.Limits(response_cache=True) if response_cache else None
    for i, key in enumerate(keys):
        state.add_key(key, principal(f"cred-{i}", limits=limits))
    server = FakeAuth(state, port=port)
    await server.start()
    print(f"PORT {server.port}", flush=True)
    assert server.server is not None
    await server.server.wait_for_stop_signal()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the double as a process (benchmarks): every --key is a valid key."""
    import argparse

    parser = argparse.ArgumentParser(description="tokenyard test-double auth")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", action="append", default=[])
    parser.add_argument("--cache-ttl", type=float, default=60.0)
    parser.add_argument(
        "--response-cache", action="store_true", help="the keys' limits enable the response cache"
    )
    args = parser.parse_args(argv)
    asyncio.run(_main(args.port, args.key, args.cache_ttl, args.response_cache))


if __name__ == "__main__":
    main()
