"""Assembles an inference worker from its settings; used by the CLI and tests.

app = InferenceApp(settings, loaded)   # loaded: a LoadedModel (load_model or testing)
port = await app.start()               # engine warmed up, health SERVING
...
await app.stop()                       # graceful: streams finish, engine stopped
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc
from tokenyard.inference.v1 import worker_service_pb2_grpc as worker_grpc

from services.common.lenient import lenient
from services.common.server import GrpcServer
from services.inference import metrics, servicer, worker_service
from services.inference.engine.engine import Engine
from services.inference.metrics import LoadSampler
from services.inference.model_loading import LoadedModel, default_kv_cache_bytes
from services.inference.settings import InferenceSettings
from services.inference.worker import Worker, WorkerInfo, tokenyard_version

log = logging.getLogger("tokenyard.inference")


def load(settings: InferenceSettings) -> LoadedModel:
    """Load the configured model (blocking; raises ModelLoadError with a clear message)."""
    from services.inference.model_loading import load_model

    return load_model(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.cache_dir,  # model_sources.converted expands ~
    )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def served_revision(revision: str, quantization: str) -> str:
    """The weights' revision as served: quantised weights answer differently, so
    the response cache must not mix their answers with the unquantised ones'."""
    if not revision or quantization == "none":
        return revision
    return f"{revision}+{quantization}"


class InferenceApp:
    """A worker: the engine over a loaded model, its servicers and its gRPC server."""

    def __init__(
        self,
        settings: InferenceSettings,
        loaded: LoadedModel,
        *,
        compute_threads: int | None = None,
        owns_model: bool = False,
    ) -> None:
        """`compute_threads`: see `Engine`; the CLI confines torch before loading.

        `owns_model`: nothing else uses `loaded`, so the engine may free the model's
        weights it copies (the CLI's worker; tests reuse one model across apps).
        """
        self.settings = settings
        self.loaded = loaded
        kv_bytes = settings.kv_cache_mib * 2**20 or default_kv_cache_bytes(loaded.device)
        self.engine = Engine(
            loaded,
            max_running=settings.max_running,
            max_queued=settings.max_queued,
            max_batch_tokens=settings.max_batch_tokens,
            prefix_cache=settings.prefix_cache,
            kv_cache_bytes=kv_bytes,
            compute_threads=compute_threads,
            take_model_weights=owns_model,
            quantize=settings.quantize,
        )
        log.info(
            "model %s: %s path", loaded.name, self.engine.path, extra={"path": self.engine.path}
        )
        log.info(
            "kv cache budget %d MiB: up to %d positions per sequence, %d sequences",
            kv_bytes // 2**20,
            self.engine.context_length,
            settings.max_running,
        )
        info = WorkerInfo(
            model=settings.served_model_name or loaded.name,
            context_length=self.engine.context_length,
            vocab_size=self.engine.runner.vocab_size,
            max_running=settings.max_running,
            max_queued=settings.max_queued,
            device=str(loaded.device),
            dtype=_dtype_name(loaded.dtype),
            prefix_cache=self.engine.prefix_cache_enabled,
            version=tokenyard_version(),
            execution_path=self.engine.path,
            model_revision=served_revision(loaded.revision, self.engine.runner.quantization),
            quantization=self.engine.runner.quantization,
        )
        self.server = GrpcServer(
            settings.server, service_token=settings.internal.service_token or None
        )
        self.worker = Worker(
            self.engine,
            loaded.tokenizer,
            info,
            eos_token_ids=loaded.eos_token_ids,
            max_n=settings.max_n,
            on_drained=lambda: self.server.set_serving(False),
        )
        self.server.add(
            lenient(gen_grpc.add_GenerationServiceServicer_to_server),
            servicer.GenerationServicer(self.worker),
            servicer.SERVICE_NAME,
        )
        self.server.add(
            lenient(worker_grpc.add_WorkerServiceServicer_to_server),
            worker_service.WorkerServicer(self.worker),
            worker_service.SERVICE_NAME,
        )
        self.sampler = LoadSampler(self.engine.stats, queue=self.worker.queue_times)
        self.port = 0

    @property
    def address(self) -> str:
        """host:port the router connects to."""
        return f"{self.settings.server.host}:{self.port}"

    async def start(self) -> int:
        """Warm the engine up, then serve; health turns SERVING only after the warmup."""
        await asyncio.to_thread(self.engine.start, warm=True)  # warms up on its own thread
        self.port = await self.server.start()
        self.worker.worker_id = f"{self.address}-{secrets.token_hex(4)}"
        self.sampler.start()
        metrics.MODEL_INFO.labels(self.worker.info.model).set(1)
        await self.server.set_serving(True)
        log.info(
            "serving",
            extra={"model": self.worker.info.model, "address": self.address},
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain, refuse new calls, let running ones finish within grace, stop the engine.

        Draining first (what SIGTERM does) tells every router through WatchLoad to
        send new work elsewhere while the streams here run to their end; what is
        still running when the grace period is over is cut, and routers resume it
        on another worker.
        """
        grace = self.settings.server.grace_period if grace is None else grace
        started = time.monotonic()
        if grace > 0:
            await self.worker.drained(grace)
        self.worker.end_watches()
        await self.server.stop(max(grace - (time.monotonic() - started), 0.0))
        await self.worker.close()
        await self.sampler.stop()
        await self.engine.stop()
