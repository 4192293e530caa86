"""Test harness: a worker on loopback over a tiny model, and scripted tiny models.

A scripted model is the tiny random-weight Llama with its attention and MLP outputs
zeroed, so each step's logits depend only on the current token, and an lm_head
that maps each token of a script to the next one. Greedy decoding after the
script's start token then produces exactly the script's text (and EOS), which
lets tests construct stop strings, split UTF-8 characters and finish reasons.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc
from tokenyard.inference.v1 import worker_service_pb2 as wpb
from tokenyard.inference.v1 import worker_service_pb2_grpc as wpb_grpc

from services.inference.app import InferenceApp
from services.inference.model_loading import LoadedModel
from services.inference.settings import InferenceServerSettings, InferenceSettings
from tests.doubles.tiny_model import build_tiny_model

MODEL = "tiny-llama"


@dataclass(frozen=True)
class Script:
    """A scripted model: prompt with `start_id` and greedy decoding yields `token_ids`."""

    loaded: LoadedModel
    start_id: int
    token_ids: list[int]
    text: str


def scripted_model(tokenizer: Any, text: str, *, eos: bool = True) -> Script:
    """A tiny model whose greedy continuation of its start token is `text` (then EOS)."""
    ids = list(tokenizer.encode(text))
    eos_id = int(tokenizer.eos_token_id)
    start = next(t for t in range(len(tokenizer) - 1, 0, -1) if t not in ids and t != eos_id)
    chain = [start, *ids, *([eos_id] if eos else [])]
    nexts: dict[int, int] = {}
    for a, b in itertools.pairwise(chain):
        assert nexts.setdefault(a, b) == b, f"token {a} has two successors in {text!r}"
    loaded = build_tiny_model(tokenizer=tokenizer)
    model = loaded.model
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        head.zero_()
        for a, b in nexts.items():
            head[b] = 10 * embed[a] / embed[a].norm()
    return Script(loaded, start, ids, text)


@dataclass
class Running:
    """A worker serving on loopback, with a channel and stubs to it."""

    app: InferenceApp
    channel: grpc.aio.Channel
    gen: gen_grpc.GenerationServiceStub
    worker: wpb_grpc.WorkerServiceStub

    async def watch_until(self, predicate: Any, interval_ms: int = 20) -> wpb.WatchLoadResponse:
        """Read WatchLoad reports until one satisfies `predicate`; return it."""
        call = self.worker.WatchLoad(wpb.WatchLoadRequest(interval_ms=interval_ms))
        try:
            async for report in call:
                if predicate(report):
                    return report  # type: ignore[no-any-return]
        finally:
            call.cancel()
        raise AssertionError("WatchLoad ended")


def settings(**overrides: Any) -> InferenceSettings:
    """Worker settings for tests: a free port, short grace, small limits."""
    server = InferenceServerSettings(port=0, grace_period=2.0)
    base = InferenceSettings(server=server, max_running=4, max_queued=4, max_batch_tokens=64)
    return dataclasses.replace(base, **overrides)


@asynccontextmanager
async def serving(
    loaded: LoadedModel | None = None, *, metadata: Sequence[tuple[str, str]] = (), **overrides: Any
) -> AsyncIterator[Running]:
    """Start a worker in-process (tiny random model unless given); stop it after."""
    app = InferenceApp(settings(**overrides), loaded or build_tiny_model())
    port = await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(
            app,
            channel,
            gen_grpc.GenerationServiceStub(channel),
            wpb_grpc.WorkerServiceStub(channel),
        )
    finally:
        await channel.close()
        await asyncio.wait_for(app.stop(0), 30)


def request(**fields: Any) -> gen.StreamGenerateRequest:
    """A StreamGenerateRequest for the tiny model (model filled in)."""
    fields.setdefault("model", MODEL)
    return gen.StreamGenerateRequest(**fields)


async def stream_all(
    stub: gen_grpc.GenerationServiceStub, req: gen.StreamGenerateRequest, **kw: Any
) -> list[gen.StreamGenerateResponse]:
    """Every message of a StreamGenerate call."""
    return [m async for m in stub.StreamGenerate(req, **kw)]


def as_generate(req: gen.StreamGenerateRequest) -> gen.GenerateRequest:
    """The same request for the unary Generate."""
    return gen.GenerateRequest.FromString(req.SerializeToString())
