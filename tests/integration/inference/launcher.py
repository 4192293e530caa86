"""Run `tokenyard inference serve` as a real process and wait for health SERVING."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port

TOKENYARD = Path(sys.executable).with_name("tokenyard")


class WorkerProcess:
    """One worker process on a free port; stderr goes to a file for failure messages."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = log
        full_env = {**os.environ, "TOKENYARD_LOG_FORMAT": "text", **(env or {})}
        full_env.setdefault("OMP_NUM_THREADS", "1")
        command = [str(TOKENYARD)] if TOKENYARD.exists() else [sys.executable, "-m", "services.cli"]
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [*command, "inference", "serve", "--port", str(self.port), *args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_serving(self, timeout: float = 120.0) -> None:
        """Poll health until SERVING; fail with the process output if it exits first."""
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.output()}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker not SERVING after {timeout} s:\n{self.output()}")
                await asyncio.sleep(0.2)

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit code (kill after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = await asyncio.to_thread(self.proc.wait)
        self._log_file.close()
        return code
