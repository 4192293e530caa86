"""`tokenyard up` as users run it: first start, reuse, clean stop (real processes)."""

from __future__ import annotations

import stat
from pathlib import Path

from tests.integration.stack.launcher import READY, StackProcess, alive, run_cli


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_prints_the_key_once_and_a_second_start_reuses_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = StackProcess(state, tiny_model)
    try:
        first.wait_for(READY)
        key = (state / "demo-key").read_text().strip()
        assert key.startswith("ty_") and key in first.output
        assert "tokenyard generate" in first.output
        assert mode(state) == 0o700
        for name in ("demo-key", "service-token", "key-pepper", "admin-key"):
            assert mode(state / name) == 0o600, name
        for name in ("service-token", "key-pepper"):
            assert (state / name).read_text().strip() not in first.output
        streamed = run_cli(
            "generate", "--address", first.address, "--state-dir", str(state),
            "--model", "tiny", "--max-tokens", "8", "--ignore-eos", "--seed", "3", "Hello",
        )  # fmt: skip
        assert streamed.returncode == 0, streamed.stderr
        assert "completion 8 tokens" in streamed.stderr and "ttft" in streamed.stderr
        assert "tokens/s" in streamed.stderr and "LENGTH" in streamed.stderr
        pids = first.children()
        assert set(pids) == {"auth", "router", f"inference:{first.worker_port}"}, first.tail()
    finally:
        code = first.stop()
    assert code == 0, first.tail()
    assert not [name for name, pid in pids.items() if alive(pid)]
    assert "stopped" in first.output

    second = StackProcess(state, tiny_model)
    try:
        second.wait_for(READY)
        assert key not in second.output
        assert f"Demo API key: in {state / 'demo-key'}" in second.output
        assert (state / "demo-key").read_text().strip() == key
        again = run_cli(
            "generate", "--address", second.address, "--model", "tiny", "--max-tokens", "4",
            "--ignore-eos", "Hello", env={"TOKENYARD_API_KEY": key},
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert "completion 4 tokens" in again.stderr
    finally:
        assert second.stop() == 0


def test_a_model_that_cannot_load_stops_the_stack_with_a_message(tmp_path: Path) -> None:
    stack = StackProcess(tmp_path / "state", tmp_path / "no-such-model")
    try:
        code = stack.proc.wait(120)
    finally:
        stack.stop()
    assert code == 1
    assert "error: worker-1 exited with code" in stack.output
    assert not stack.children()
