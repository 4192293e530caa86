"""The Node.js clients (clients/node) against a real stack: list, stream, cancel, errors,
over gRPC (client.mjs) and over the OpenAI-compatible HTTP API (openai-http.mjs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack.launcher import READY, StackProcess
from tests.unit.stack.compose_file import ROOT

NODE_DIR = ROOT / "clients" / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    """clients/node with its locked dependencies installed (`npm ci` when missing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js 20 is not installed")
    modules = NODE_DIR / "node_modules"
    lock = NODE_DIR / "package-lock.json"
    stamp = modules / ".package-lock.json"
    if not stamp.is_file() or stamp.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    return NODE_DIR / "client.mjs"


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    proc = StackProcess(tmp_path_factory.mktemp("node") / "state", tiny_model)
    try:
        proc.wait_for(READY)
        yield proc
    finally:
        proc.stop()


def test_node_client_lists_streams_cancels_and_reads_error_details(
    node_client: Path, stack: StackProcess
) -> None:
    key = (stack.state_dir / "demo-key").read_text().strip()
    env = dict(os.environ, TOKENYARD_API_KEY=key)
    done = subprocess.run(
        ["node", str(node_client), "--address", stack.address, "--model", "tiny",
         "--max-tokens", "8", "--deadline", "30"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "models: tiny (1 workers)" in lines
    assert "completion_tokens=8" in done.stdout and "FINISH_REASON_LENGTH" in done.stdout
    # The usage's `cached` flag reaches Node (false: the demo key leaves the cache off).
    assert "completion_tokens=8 cached=false" in done.stdout
    assert "cancelled: true after 3 messages" in lines
    structured = next(line for line in lines if line.startswith("structured: "))
    assert structured in (
        'structured: FINISH_REASON_STOP {"answer":"yes"}',
        'structured: FINISH_REASON_STOP {"answer":"no"}',
    )
    assert (
        "rejected (bad schema): INVALID_ARGUMENT reason=INVALID_ARGUMENT "
        "field=response_format.json_schema" in lines
    )
    # --n 2 (the default): two samples of 8 tokens, usage counting both.
    assert (
        "samples: 0:FINISH_REASON_LENGTH:8 1:FINISH_REASON_LENGTH:8 completion_tokens=16" in lines
    )
    assert "rejected (bad key): UNAUTHENTICATED reason=UNAUTHENTICATED" in lines
    assert (
        "rejected (bad top_p): INVALID_ARGUMENT reason=INVALID_ARGUMENT field=sampling.top_p"
        in lines
    )
    assert key not in done.stdout + done.stderr
    # The cancelled stream reached the worker as a cancellation, not a finished generation.
    stack.wait_for("GenerationService/StreamGenerate CANCELLED", timeout=10)


def test_node_openai_package_streams_over_http_and_reads_errors(
    node_client: Path, stack: StackProcess
) -> None:
    key = (stack.state_dir / "demo-key").read_text().strip()
    env = dict(
        os.environ,
        OPENAI_API_KEY=key,
        OPENAI_BASE_URL=f"http://127.0.0.1:{stack.http_port}/v1",
    )
    done = subprocess.run(
        ["node", str(node_client.with_name("openai-http.mjs")), "--model", "tiny",
         "--max-tokens", "5"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "models: tiny" in lines
    assert "completion_tokens=5" in done.stdout
    assert any(line.startswith("role=assistant finish_reason=length") for line in lines)
    assert "rejected (bad key): 401 AuthenticationError param=null" in lines
    assert "rejected (bad temperature): 400 BadRequestError param=temperature" in lines
    assert key not in done.stdout + done.stderr
