"""`tokenyard up` failing to start: a clear message, nothing left running."""

from __future__ import annotations

from pathlib import Path

from tests.integration.stack.launcher import StackProcess


def test_a_model_that_cannot_load_stops_the_stack_with_a_message(tmp_path: Path) -> None:
    stack = StackProcess(tmp_path / "state", tmp_path / "no-such-model")
    try:
        code = stack.proc.wait(120)
    finally:
        stack.stop()
    assert code == 1
    assert "error: worker-1 exited with code" in stack.output
    assert not stack.children()
