"""CPU speed paths change nothing but speed: packed bf16 weights, bf16 logits, threads."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import torch

from services.inference.engine import Engine, Sampling, avx512
from services.inference.engine.runner import Runner, packs_weights
from services.inference.engine.sampling import SampleRow, sample
from services.inference.engine.threads import (
    claim_torch_threads,
    confine_torch_threads,
    release_default_threads,
)
from services.inference.model_loading import LoadedModel
from tests.doubles.tiny_model import build_tiny_model
from tests.unit.inference.helpers import collect, request

pytestmark = pytest.mark.timeout(60)
MKLDNN = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
# oneDNN packs bf16 weights only on CPUs with AVX-512 or AVX-NE-CONVERT; where
# avx512.py serves bf16 layers (no AMX) the runner keeps plain weights for it.
PACKS_BF16 = MKLDNN and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and not avx512.serves()


@pytest.fixture(scope="module")
def tiny_bf16() -> LoadedModel:
    return build_tiny_model(seed=3, dtype=torch.bfloat16)


def test_weights_are_packed_only_for_bf16_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert packs_weights(torch.bfloat16, cpu) is PACKS_BF16
    assert not packs_weights(torch.float32, cpu)
    assert not packs_weights(torch.float16, cpu)
    assert not packs_weights(torch.bfloat16, torch.device("cuda"))


@pytest.mark.skipif(not PACKS_BF16, reason="bf16 weights are not packed on this CPU")
def test_packed_weights_give_bit_identical_logits(
    tiny_bf16: LoadedModel, prompts: list[list[int]]
) -> None:
    packed, plain = Runner(tiny_bf16.model), Runner(tiny_bf16.model, pack_weights=False)
    assert packed.packed and not plain.packed
    caches = [packed.new_cache(4, 64), plain.new_cache(4, 64)]
    chunks = [(slot, torch.tensor(prompts[slot + 1]), 0) for slot in range(4)]
    logits = [r.prefill(c, chunks) for r, c in zip((packed, plain), caches, strict=True)]
    assert logits[0].dtype is torch.bfloat16
    assert torch.equal(logits[0], logits[1])
    positions = torch.tensor([len(prompts[slot + 1]) for slot in range(4)])
    for _ in range(5):  # greedy decode steps over the cache each runner filled
        tokens = logits[0].argmax(-1)
        mask = torch.arange(int(positions.max()) + 1)[None] <= positions[:, None]
        logits = [
            r.decode(c, tokens, positions, r.write_rows(c, positions), mask[:, None, None])
            for r, c in zip((packed, plain), caches, strict=True)
        ]
        assert torch.equal(logits[0], logits[1])
        positions = positions + 1


def test_sampling_bf16_logits_equals_sampling_them_widened() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(6, 300) * 4).to(torch.bfloat16)
    configs = [
        Sampling(max_tokens=4, temperature=0.0),
        Sampling(max_tokens=4, temperature=0.0, logprobs=3),
        Sampling(max_tokens=4, temperature=0.8, top_p=0.9, seed=1),
        Sampling(max_tokens=4, temperature=1.2, top_k=20, min_p=0.01, seed=2),
        Sampling(max_tokens=4, temperature=0.7, repetition_penalty=1.3, seed=3),
        Sampling(max_tokens=4, temperature=0.0, repetition_penalty=1.5),
    ]
    rows = [SampleRow(c, 7, i, [1, 5, 9, 200]) for i, c in enumerate(configs)]
    for subset in (rows[:1], rows[:2], rows):  # all-greedy, greedy + logprobs, mixed
        n = len(subset)
        assert sample(logits[:n], subset) == sample(logits[:n].float(), subset)
    assert sample(logits[:1], rows[:1])[0].token_id == int(logits[0].float().argmax())
    before = logits.clone()
    sample(logits, rows)
    assert torch.equal(logits, before)  # the caller's logits are never changed


def test_a_claim_survives_the_default_going_back_to_one() -> None:
    original = torch.get_num_threads()
    seen: dict[str, int] = {}

    def compute() -> None:
        claim_torch_threads(2)
        claimed.set()
        go.wait()
        torch.ones(100_000).sum()  # a parallel op after the default changed
        seen["compute"] = torch.get_num_threads()

    def later() -> None:
        seen["later"] = torch.get_num_threads()

    claimed, go = threading.Event(), threading.Event()
    try:
        assert confine_torch_threads() == original
        thread = threading.Thread(target=compute)
        thread.start()
        claimed.wait()
        release_default_threads()
        go.set()
        thread.join()
        other = threading.Thread(target=later)
        other.start()
        other.join()
        assert seen == {"compute": 2, "later": 1}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(original)


async def test_the_engine_claims_its_threads_and_confines_the_rest(
    tiny: LoadedModel, prompts: list[list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    original = torch.get_num_threads()
    caplog.set_level(logging.INFO, logger="services.inference.engine.engine")
    try:
        confine_torch_threads()
        engine = Engine(tiny, max_running=2, max_queued=2, max_batch_tokens=32, compute_threads=2)
        engine.start()
        try:
            events = await collect(engine, request(prompts[2], temperature=0.0, max_tokens=3))
            assert len(events) == 3
            assert "engine compute thread: 2 intra-op threads" in caplog.text
            assert torch.get_num_threads() == 1
            assert await asyncio.to_thread(torch.get_num_threads) == 1  # a new thread
        finally:
            await engine.stop()
        with pytest.raises(ValueError, match="compute_threads"):
            Engine(tiny, max_running=2, max_queued=2, max_batch_tokens=32, compute_threads=0)
    finally:
        torch.set_num_threads(original)


def test_decode_over_the_whole_capacity_equals_decode_over_the_used_span(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    runner = Runner(tiny.model)
    cache = runner.new_cache(3, 128)
    chunks = [(slot, torch.tensor(prompts[slot + 2]), 0) for slot in range(3)]
    tokens = runner.prefill(cache, chunks).argmax(-1)
    positions = torch.tensor([len(prompts[slot + 2]) for slot in range(3)])
    write = runner.write_rows(cache, positions)
    logits = []
    for width in (int(positions.max()) + 1, cache.capacity):
        mask = torch.arange(width)[None] <= positions[:, None]
        logits.append(runner.decode(cache, tokens, positions, write, mask[:, None, None]))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_an_engine_that_takes_the_weights_frees_the_copies_and_keeps_its_output(
    dtype: torch.dtype, prompts: list[list[int]]
) -> None:
    loaded = build_tiny_model(seed=5, dtype=dtype)
    expected = Engine(loaded, max_running=2, max_queued=2, max_batch_tokens=32)
    expected.start()
    model = loaded.model
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    fused = sum(
        m.weight.numel() * m.weight.element_size()
        for layer in model.model.layers
        for m in (
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
        )
    )
    lone = sum(  # weights copied only when packed (oneDNN's or avx512.py's layout)
        m.weight.numel() * m.weight.element_size()
        for layer in model.model.layers
        for m in (layer.self_attn.o_proj, layer.mlp.down_proj)
    )
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    head_shape = (model.lm_head.weight.shape[0], model.lm_head.weight.shape[1])
    try:
        want = [
            await collect(expected, request(p, f"e{i}", temperature=0.0, max_tokens=8))
            for i, p in enumerate(prompts[:3])
        ]
        engine = Engine(
            loaded, max_running=2, max_queued=2, max_batch_tokens=32, take_model_weights=True
        )
        engine.start()
        try:
            got = [
                await collect(engine, request(p, f"g{i}", temperature=0.0, max_tokens=8))
                for i, p in enumerate(prompts[:3])
            ]
        finally:
            await engine.stop()
    finally:
        await expected.stop()
    assert [[e.token_id for e in r] for r in got] == [[e.token_id for e in r] for r in want]
    runner = engine.runner
    assert isinstance(runner, Runner)
    packed = runner.packed or runner.pairs
    head_packed = runner.packed or (runner.pairs and avx512.fits(head_shape))
    expected_bytes = fused + (lone if packed else 0) + (head if head_packed else 0)
    assert runner.released_bytes == expected_bytes
    assert attn.q_proj.weight.numel() == 0 and mlp.up_proj.weight.numel() == 0
    assert (attn.o_proj.weight.numel() == 0) is packed  # unpacked, the runner uses it
