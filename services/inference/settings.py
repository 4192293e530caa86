"""Settings of an inference worker, from `TOKENYARD_INFERENCE_*` variables and flags.

Built once by `tokenyard inference serve` and passed down; nothing here reads the
environment by itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.config import (
    InternalSettings,
    ObservabilitySettings,
    ServerSettings,
    check_internal_exposure,
    port_setting,
)
from services.common.requests import max_n_setting
from services.common.settings import (
    load_settings,
    parse_bool,
    parse_choice,
    parse_non_negative_int,
    parse_path,
    parse_positive_int,
    setting,
)

SERVICE = "inference"
DEFAULT_PORT = 50061
# Expanded where used, so importing this module never reads $HOME.
DEFAULT_CACHE_DIR = Path("~/.cache/tokenyard/models")
# --quantize choices: the engine's weight-only forms (engine/quant.py).
QUANTIZATIONS = ("none", "int8", "int4")


def parse_device(raw: str) -> str:
    """auto, cpu, cuda or cuda:N."""
    low = raw.lower()
    if low in {"auto", "cpu", "cuda"}:
        return low
    index = low.removeprefix("cuda:")
    if low.startswith("cuda:") and index.isdigit():
        return low
    raise ValueError("expected auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class InferenceServerSettings(ServerSettings):
    """The worker's internal listener: as every service's, on port 50061 by default."""

    port: int = port_setting(DEFAULT_PORT)


@dataclass(frozen=True, kw_only=True)
class InferenceSettings:
    """Everything `tokenyard inference serve` needs (prefix TOKENYARD_INFERENCE_)."""

    server: InferenceServerSettings = field(default_factory=InferenceServerSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    internal: InternalSettings = field(default_factory=InternalSettings)

    model: str = setting(
        "TOKENYARD_{service}_MODEL",
        default="smollm2-135m",
        flag="--model",
        help="Model to serve: smollm2-135m (demo), a model directory, a GGUF file or a hub id.",
    )
    served_model_name: str | None = setting(
        "TOKENYARD_{service}_SERVED_MODEL_NAME",
        default=None,
        flag="--served-model-name",
        help="Name clients use for the model (default: derived from --model).",
    )
    device: str = setting(
        "TOKENYARD_{service}_DEVICE",
        parse_device,
        default="auto",
        flag="--device",
        help="auto, cpu, cuda or cuda:N.",
    )
    dtype: str = setting(
        "TOKENYARD_{service}_DTYPE",
        parse_choice("auto", "float32", "bfloat16", "float16"),
        default="auto",
        flag="--dtype",
        help=(
            "Weight data type; auto is bfloat16 on GPU and on CPUs with bf16 hardware "
            "(AMX, AVX-512 BF16), float32 on other CPUs."
        ),
    )
    quantize: str = setting(
        "TOKENYARD_{service}_QUANTIZE",
        parse_choice(*QUANTIZATIONS),
        default="none",
        flag="--quantize",
        help=(
            "Quantisation of the model's linear layers on CPU: none, int8 (per channel) "
            "or int4 (groups of 32); the output head is int8 in both. Weights only, except "
            "on AVX-512 BF16 CPUs without AMX, where each layer also quantises its input "
            "rows to int8. Smaller, and faster at every concurrency there and at few "
            "streams elsewhere, at a measured quality cost (docs/models.md)."
        ),
    )
    max_running: int = setting(
        "TOKENYARD_{service}_MAX_RUNNING",
        parse_positive_int,
        default=8,
        flag="--max-running",
        help="Most sequences decoded at once.",
    )
    max_queued: int = setting(
        "TOKENYARD_{service}_MAX_QUEUED",
        parse_positive_int,
        default=32,
        flag="--max-queued",
        help="Most requests waiting for a slot; beyond it calls get RESOURCE_EXHAUSTED.",
    )
    max_n: int = max_n_setting()
    max_batch_tokens: int = setting(
        "TOKENYARD_{service}_MAX_BATCH_TOKENS",
        parse_positive_int,
        default=512,
        flag="--max-batch-tokens",
        help="Most tokens (prefill chunks plus decodes) computed in one engine step.",
    )
    kv_cache_mib: int = setting(
        "TOKENYARD_{service}_KV_CACHE_MIB",
        parse_non_negative_int,
        default=0,
        flag="--kv-cache-mib",
        help=(
            "Memory for running sequences' keys and values; it caps the context each "
            "sequence may use. 0: half the memory available after the model loads "
            "(80% of free GPU memory on a GPU)."
        ),
    )
    prefix_cache: bool = setting(
        "TOKENYARD_{service}_PREFIX_CACHE",
        parse_bool,
        default=True,
        flag="--prefix-cache",
        help="Reuse computed keys/values of shared prompt prefixes.",
    )
    cache_dir: Path = setting(
        "TOKENYARD_{service}_CACHE_DIR",
        parse_path,
        default=DEFAULT_CACHE_DIR,
        flag="--cache-dir",
        help="Where converted models (the demo model's safetensors copy) are kept.",
    )


def load_inference_settings(
    environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> InferenceSettings:
    """InferenceSettings from the environment and CLI flags (flags win)."""
    settings = load_settings(InferenceSettings, environ, overrides, service=SERVICE)
    check_internal_exposure("TOKENYARD_INFERENCE_HOST", settings.server.host, settings.internal)
    return settings
