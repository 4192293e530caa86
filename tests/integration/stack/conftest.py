"""Fixtures of the stack tests: the tiny model, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.stack.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a tiny random Llama and its tokenizer."""
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")
