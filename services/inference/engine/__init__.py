"""The inference engine: continuous batching over a lean forward pass, no gRPC.

The public surface is re-exported here; the modules behind it are private.
"""

from __future__ import annotations

from services.common.requests import Sampling
from services.inference.engine.engine import Engine
from services.inference.engine.types import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    NO_TOKEN,
    EngineClosed,
    EngineError,
    EngineFull,
    EngineRequest,
    EngineSaturated,
    EngineStats,
    InvalidRequest,
    TokenEvent,
)

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "NO_TOKEN",
    "Engine",
    "EngineClosed",
    "EngineError",
    "EngineFull",
    "EngineRequest",
    "EngineSaturated",
    "EngineStats",
    "InvalidRequest",
    "Sampling",
    "TokenEvent",
]
