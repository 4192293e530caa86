"""Run `tokenyard up` as a real process in tests: start, wait for the banner, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import free_port

READY = "Press Ctrl-C to stop."


class StackProcess:
    """One `tokenyard up` with free ports; its output is collected in `output`.

    `model` is served as "tiny"; with None, `extra` names the `models` (--models
    or --models-file), each with `workers` workers unless a models file says
    otherwise.
    """

    def __init__(
        self,
        state_dir: Path,
        model: Path | None,
        *,
        workers: int = 1,
        models: int = 1,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.port, self.auth_port, self.http_port = free_port(), free_port(), free_port()
        self.worker_port = _free_run(workers * models)
        self.metrics_port = _free_run(2 + workers * models)
        self.workers = workers * models
        named = [] if model is None else ["--model", str(model), "--model-name", "tiny"]
        argv = [
            sys.executable, "-m", "services.cli", "up", "--state-dir", str(state_dir), *named,
            "--workers", str(workers), "--port", str(self.port),
            "--auth-port", str(self.auth_port), "--worker-port", str(self.worker_port),
            "--http-port", str(self.http_port),
            "--metrics-port", str(self.metrics_port), "--threads", "1", "--max-restarts", "2",
            *extra,
        ]  # fmt: skip
        full_env = dict(os.environ)
        full_env.update(TOKENYARD_AUTH_ARGON2_MEMORY_KIB="8192", TOKENYARD_LOG_FORMAT="text")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, text=True
        )
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self._lines)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        """Wait until `text` appears in the output (fail if the launcher exits first)."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None:
                self._reader.join(5)  # the rest of its output, up to the end of the pipe
                if text in self.output:
                    return
                raise AssertionError(
                    f"tokenyard up exited ({self.proc.returncode}):\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout} s:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, lines: int = 40) -> str:
        return "".join(self._lines[-lines:])

    def children(self) -> dict[str, int]:
        """pid of each service process, by the command it runs (auth, inference, router)."""
        out: dict[str, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
                env = (stat.parent / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            words = [c.decode() for c in cmd]
            if "services.cli" in words:
                kind = words[words.index("services.cli") + 1]
                variable = f"TOKENYARD_{kind.upper()}_PORT="
                port = next(
                    (e.decode()[len(variable) :] for e in env if e.decode().startswith(variable)),
                    "",
                )
                out[f"{kind}{':' + port if kind == 'inference' else ''}"] = int(stat.parent.name)
        return out

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the launcher and wait for it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def _free_run(count: int) -> int:
    """The first of `count` consecutive ports that look free."""
    for _ in range(50):
        base = free_port()
        if base + count >= 65535:
            continue
        if all(_is_free(base + i) for i in range(1, count)):
            return base
    raise RuntimeError("no run of free ports")


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `tokenyard ARGS` and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
