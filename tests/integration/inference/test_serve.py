"""`tokenyard inference serve` as a real process: tiny model, then the demo model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc
from tokenyard.inference.v1 import worker_service_pb2 as wpb
from tokenyard.inference.v1 import worker_service_pb2_grpc as wpb_grpc

from services.common.interceptors import SERVICE_TOKEN_HEADER
from tests.doubles.tiny_model import build_tiny_model
from tests.integration.inference.launcher import WorkerProcess

TOKEN = "integration-service-token"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model saved as a Hugging Face model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    loaded = build_tiny_model()
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
async def worker(model_dir: Path, tmp_path: Path) -> AsyncIterator[WorkerProcess]:
    process = WorkerProcess(
        ["--model", str(model_dir), "--served-model-name", "tiny", "--device", "cpu"],
        tmp_path / "worker.log",
        env={
            "TOKENYARD_SERVICE_TOKEN": TOKEN,
            "TOKENYARD_INFERENCE_DTYPE": "float32",
            "OMP_NUM_THREADS": "2",
        },
    )
    try:
        await process.wait_serving()
        yield process
    finally:
        await process.stop()


async def test_serve_streams_and_stops_cleanly(worker: WorkerProcess) -> None:
    metadata = ((SERVICE_TOKEN_HEADER, TOKEN),)
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        describe = await wpb_grpc.WorkerServiceStub(channel).Describe(
            wpb.DescribeRequest(), metadata=metadata
        )
        req = gen.StreamGenerateRequest(
            model="tiny",
            messages=gen.ChatMessages(messages=[gen.ChatMessage(role="user", content="hi")]),
            sampling=gen.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
        )
        messages = [m async for m in stub.StreamGenerate(req, metadata=metadata)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(gen.GenerateRequest(model="tiny", prompt="hi"))
        # A router's WatchLoad stream ends cleanly on SIGTERM (no wait for the grace period).
        watch = wpb_grpc.WorkerServiceStub(channel).WatchLoad(
            wpb.WatchLoadRequest(), metadata=metadata
        )
        await watch.read()
        assert await worker.stop() == 0
        while await watch.read() is not grpc.aio.EOF:
            pass
        assert await watch.code() == grpc.StatusCode.OK
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (describe.model, describe.dtype, describe.device) == ("tiny", "float32", "cpu")
    assert len(describe.model_revision) == 16  # the weights' content hash
    assert messages[-1].finish_reason == gen.FINISH_REASON_LENGTH
    assert messages[-1].usage.completion_tokens == 8
    output = worker.output()
    assert "Traceback" not in output
    # Loaded single-threaded; the compute thread alone took the 2 threads (threads.py),
    # and the engine freed the model's copies of the weights it fused.
    assert "engine compute thread: 2 intra-op threads" in output
    assert "engine took the model's weights" in output


@pytest.mark.parametrize("model", ["/nonexistent/model-dir", "nobody/no-such-model"])
async def test_unusable_model_exits_at_start_with_one_line(model: str, tmp_path: Path) -> None:
    process = WorkerProcess(["--model", model], tmp_path / "worker.log")
    code = await asyncio.to_thread(process.proc.wait, 60)
    await process.stop()
    output = process.output().strip()
    assert code == 1
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("tokenyard:")]
    assert len(lines) == 1
    assert model in lines[0]


@pytest.mark.slow
async def test_demo_model_answers_paris(tmp_path: Path) -> None:
    process = WorkerProcess(["--model", "smollm2-135m"], tmp_path / "worker.log")
    try:
        await process.wait_serving(timeout=180)
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            question = gen.ChatMessage(role="user", content="What is the capital of France?")
            req = gen.StreamGenerateRequest(
                model="smollm2-135m",
                messages=gen.ChatMessages(messages=[question]),
                sampling=gen.SamplingParams(max_tokens=40, temperature=0),
            )
            messages = [m async for m in stub.StreamGenerate(req, timeout=120)]
    finally:
        assert await process.stop() == 0
    text = "".join(m.text for m in messages)
    assert "Paris" in text, text
    assert len(messages) > 2  # streamed, not one lump
    assert messages[-1].finish_reason in (gen.FINISH_REASON_STOP, gen.FINISH_REASON_LENGTH)
