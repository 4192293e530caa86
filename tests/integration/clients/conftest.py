"""Fixtures of the client tests: the tiny model (shared with the stack tests)."""

from __future__ import annotations

from tests.integration.stack.conftest import tiny_model

__all__ = ["tiny_model"]
