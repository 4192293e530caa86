"""The fused per-layer ops: RMSNorm, rotary and the decode step's cache writes
(engine/cpu_kernels.py OPS, csrc/cpu_ops.cpp).

They build without ISA flags, so they must build and run on any CPU the suite runs
on; a failed build fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from services.inference.engine import cpu_kernels
from services.inference.engine.runner import Runner
from services.inference.engine.sampling import first_max
from tests.doubles.tiny_model import build_tiny_model
from tests.unit.inference.helpers import prefill_then_decode

EPS = 1e-5


def transformers_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    norm = LlamaRMSNorm(x.shape[-1], eps=EPS).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        out: torch.Tensor = norm(x)
    return out


@pytest.fixture(autouse=True, scope="module")
def _ops_loaded() -> None:
    """Every test calls torch.ops.tokenyard_ops, registered when the extension loads:
    loaded here, not by whichever test happens to run first."""
    cpu_kernels.OPS.available()


def test_the_ops_build_and_run_on_this_cpu() -> None:
    assert cpu_kernels.OPS.available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_rms_norm_is_transformers_llama_rms_norm(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(rows)
    x = (torch.randn(rows, 576) * 3).to(dtype)
    weight = (torch.rand(576) + 0.5).to(dtype)
    got = torch.ops.tokenyard_ops.rms_norm(x, weight, EPS)
    want = transformers_norm(x, weight)
    assert got.dtype == dtype
    if dtype is torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # the same roundings; the float32 sum of squares may differ in its last bit
        differ = (got != want).float().mean().item()
        assert differ < 0.01
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [5, 37])  # one thread; rows split across the team
def test_add_rms_norm_adds_in_place_then_normalises(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(1)
    x, delta = torch.randn(rows, 64).to(dtype), torch.randn(rows, 64).to(dtype)
    weight = torch.rand(64).to(dtype)
    summed = x + delta
    got = torch.ops.tokenyard_ops.add_rms_norm_(x, delta, weight, EPS)
    assert torch.equal(x, summed)  # x + delta, rounded the same way
    assert torch.equal(got, torch.ops.tokenyard_ops.rms_norm(summed, weight, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "width"), [(1, 49152), (3, 7), (5, 33), (20, 100), (64, 517)])
def test_first_max_is_torch_max_indices_ties_and_nan_included(
    dtype: torch.dtype, rows: int, width: int
) -> None:
    generator = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, width, generator=generator).to(dtype)
    logits[0, -1] = logits[0].max()  # a tie with the last column: the first one wins
    if rows > 2:
        logits[1] = float("-inf")  # every token forbidden: index 0
        logits[2, width // 2] = float("nan")  # a NaN is the maximum, as in torch.max
    small = torch.randint(0, 3, (rows, width), generator=generator).to(dtype)  # many ties
    for x in (logits, small):
        assert torch.equal(torch.ops.tokenyard_ops.first_max(x), x.max(dim=-1).indices)
    assert torch.equal(first_max(logits), logits.max(dim=-1).indices)


def test_first_max_refuses_what_it_cannot_read() -> None:
    with pytest.raises(RuntimeError, match="at least one column"):
        torch.ops.tokenyard_ops.first_max(torch.zeros(2, 0))
    with pytest.raises(RuntimeError, match="contiguous 2-D"):
        torch.ops.tokenyard_ops.first_max(torch.zeros(4, 3).t())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.tokenyard_ops.first_max(torch.zeros(2, 3, dtype=torch.float64))
    strided = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)).t()
    assert torch.equal(first_max(strided), strided.max(dim=-1).indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # all of each head, or part (Phi-4-mini)
@pytest.mark.parametrize("rows", [5, 37])
def test_rope_is_pytorchs_rotation_on_a_slice_of_the_qkv_output(
    dtype: torch.dtype, rotary_dim: int, rows: int
) -> None:
    torch.manual_seed(rotary_dim)
    heads, kv_heads, hd = 6, 2, 64
    qkv = torch.randn(rows, heads + 2 * kv_heads, hd).to(dtype)
    qk = qkv[:, : heads + kv_heads]  # a view: rows strided past the values
    cos, sin = torch.randn(rows, rotary_dim).to(dtype), torch.randn(rows, rotary_dim).to(dtype)
    got = torch.ops.tokenyard_ops.rope(qk, cos, sin)
    rot = qk[..., :rotary_dim]
    turned = rot * cos[:, None] + torch.roll(rot, rotary_dim // 2, -1) * sin[:, None]
    want = torch.cat([turned, qk[..., rotary_dim:]], dim=-1)
    assert torch.equal(got, want)  # bit for bit: the same roundings in the same order


def test_bad_input_is_refused_with_what_is_wrong() -> None:
    x, weight = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="contiguous 2-D"):
        torch.ops.tokenyard_ops.rms_norm(x[None], weight, EPS)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.tokenyard_ops.rms_norm(x.double(), weight.double(), EPS)
    with pytest.raises(RuntimeError, match="one per column of x"):
        torch.ops.tokenyard_ops.rms_norm(x, weight[:4], EPS)
    with pytest.raises(RuntimeError, match="x's dtype"):
        torch.ops.tokenyard_ops.rms_norm(x, weight.bfloat16(), EPS)
    with pytest.raises(RuntimeError, match="delta must be"):
        torch.ops.tokenyard_ops.add_rms_norm_(x, torch.randn(2, 4), weight, EPS)
    qk, cos = torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="whole heads side by side"):
        torch.ops.tokenyard_ops.rope(qk.transpose(1, 2), cos, cos)
    with pytest.raises(RuntimeError, match="one row of rotary dims per row"):
        torch.ops.tokenyard_ops.rope(qk, cos[:1], cos[:1])
    with pytest.raises(RuntimeError, match="even and at most head_dim"):
        torch.ops.tokenyard_ops.rope(qk, torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 32])
@pytest.mark.parametrize("rows", [1, 3, 37])  # one thread; rows split across the team
def test_rope_write_is_rotary_then_index_copy_into_the_cache(
    dtype: torch.dtype, rotary_dim: int, rows: int
) -> None:
    assert cpu_kernels.OPS.available()
    torch.manual_seed(rows)
    heads, kv_heads, hd, slots, capacity = 6, 2, 64, 40, 16
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * hd).to(dtype)
    cos, sin = torch.randn(rows, rotary_dim).to(dtype), torch.randn(rows, rotary_dim).to(dtype)
    k = torch.randn(slots, kv_heads, capacity, hd).to(dtype)
    v = torch.randn(slots, kv_heads, capacity, hd).to(dtype)
    # Row r writes slot 39 - r's heads at position r % capacity, as Runner.write_rows.
    where = (torch.arange(rows) * 7) % capacity
    cache_rows = ((39 - torch.arange(rows))[:, None] * kv_heads + torch.arange(kv_heads)) * capacity
    cache_rows = (cache_rows + where[:, None]).reshape(-1)
    want_k, want_v = k.clone(), v.clone()
    split = qkv.view(rows, heads + 2 * kv_heads, hd)
    turned = torch.ops.tokenyard_ops.rope(split[:, : heads + kv_heads], cos, sin)
    want_k.view(-1, hd).index_copy_(0, cache_rows, turned[:, heads:].reshape(-1, hd))
    want_v.view(-1, hd).index_copy_(0, cache_rows, split[:, heads + kv_heads :].reshape(-1, hd))
    q = torch.ops.tokenyard_ops.rope_write_(qkv, cos, sin, k, v, cache_rows, heads, kv_heads)
    assert torch.equal(q, turned[:, :heads])
    assert torch.equal(k, want_k) and torch.equal(v, want_v)  # and nothing else written


def test_rope_write_refuses_a_row_outside_the_cache_and_writes_nothing() -> None:
    assert cpu_kernels.OPS.available()
    qkv, cos = torch.randn(2, 4 * 8), torch.randn(2, 8)
    k, v = torch.zeros(3, 1, 4, 8), torch.zeros(3, 1, 4, 8)
    for bad in (12, -1):
        with pytest.raises(RuntimeError, match=rf"rows\[1\] = {bad} is outside 0..11"):
            torch.ops.tokenyard_ops.rope_write_(qkv, cos, cos, k, v, torch.tensor([0, bad]), 2, 1)
    assert not k.any() and not v.any()
    with pytest.raises(RuntimeError, match="whole heads"):
        torch.ops.tokenyard_ops.rope_write_(qkv, cos, cos, k, v, torch.tensor([0, 1]), 3, 1)
    with pytest.raises(RuntimeError, match="one cache row per row of qkv and kv head"):
        torch.ops.tokenyard_ops.rope_write_(qkv, cos, cos, k, v, torch.tensor([0]), 2, 1)
    with pytest.raises(RuntimeError, match=r"\[slots, kv_heads, capacity, head_dim\]"):
        torch.ops.tokenyard_ops.rope_write_(
            qkv, cos, cos, k[:, :, :, :4], v, torch.tensor([0, 1]), 2, 1
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_with_fused_ops_gives_the_unfused_logits(dtype: torch.dtype) -> None:
    loaded = build_tiny_model(dtype=dtype)
    runner = Runner(loaded.model)
    assert runner._fused_ops
    rows, length = 4, 20
    ids = torch.randint(
        0, runner.vocab_size, (rows, length), generator=torch.Generator().manual_seed(3)
    )

    def logits() -> torch.Tensor:
        return torch.cat(prefill_then_decode(runner, ids, capacity=32))

    fused = logits()
    runner._fused_ops = False
    unfused = logits()
    tolerance = 1e-5 if dtype is torch.float32 else 0.05
    torch.testing.assert_close(fused.float(), unfused.float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(fused.argmax(-1), unfused.argmax(-1))


BUILD = "from services.inference.engine.cpu_kernels import OPS; OPS.build(); print('built')"


def test_a_build_killed_midway_does_not_block_later_builds_and_two_builders_share(
    tmp_path: Path,
) -> None:
    """PyTorch's `lock` file, left by a builder killed mid-build, made every later
    build wait forever; and two workers starting at once must both load the kernels."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    folder = Path(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from services.inference.engine.cpu_kernels import OPS; print(OPS.folder())",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    assert folder.is_relative_to(tmp_path)
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # what a killed builder leaves
    builders = [
        subprocess.Popen([sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        outputs = [b.communicate(timeout=300)[0] for b in builders]
    finally:
        for b in builders:
            b.kill()
    assert [b.returncode for b in builders] == [0, 0]
    assert all("built" in out for out in outputs)
    assert not (folder / "lock").exists()
