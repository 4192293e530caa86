"""Model loading: specs, devices, dtypes, and clear failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from services.inference.model_loading import (
    ModelLoadError,
    cpu_has_fast_bf16,
    load_model,
    resolve_device,
    resolve_dtype,
)
from tests.doubles.tiny_model import build_tiny_model


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_bad_device(device: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="device"):
        load_model("smollm2-135m", device=device, cache_dir=tmp_path)


def test_cuda_without_gpu_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_dtypes() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ModelLoadError, match="dtype"):
        resolve_dtype("int3", cpu)
    assert issubclass(ModelLoadError, ValueError)
    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert resolve_dtype("auto", cpu) is expected


@pytest.mark.parametrize(
    ("flags", "fast"),
    [
        ("fpu sse2 avx2 fma", False),  # an AVX2-only EPYC: bf16 is emulated, fp32 wins
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu avx2 avx512f amx_bf16 amx_tile", True),
        ("fpu avx512f amx_tile", False),  # AMX without its bf16 unit
    ],
)
def test_cpu_auto_dtype_follows_bf16_hardware(flags: str, fast: bool) -> None:
    cpuinfo = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n"
    assert cpu_has_fast_bf16(cpuinfo) is fast
    assert cpu_has_fast_bf16("processor\t: 0\n") is False  # no flags line: the safe choice


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(str(tmp_path / "nope" / "model"), cache_dir=tmp_path)
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(str(not_a_model), cache_dir=tmp_path)


def test_unreachable_hub_id_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="example-org/not-a-model"):
        load_model("example-org/not-a-model", cache_dir=tmp_path)
    assert time.monotonic() - started < 10


def test_model_directory_round_trip(tmp_path: Path) -> None:
    tiny = build_tiny_model(seed=3)
    folder = tmp_path / "tiny-llama"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder), device="cpu", dtype="float32", cache_dir=tmp_path)
    assert loaded.name == "tiny-llama"
    assert loaded.dtype is torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.context_length == tiny.context_length
    assert loaded.eos_token_ids == tiny.eos_token_ids
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, tiny.model(ids).logits)
    half = load_model(str(folder), device="cpu", dtype="bfloat16", cache_dir=tmp_path)
    assert next(half.model.parameters()).dtype is torch.bfloat16
