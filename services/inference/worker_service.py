"""WorkerService: how the router learns what this worker serves and how busy it is."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import timestamp_pb2
from tokenyard.inference.v1 import worker_service_pb2 as pb
from tokenyard.inference.v1 import worker_service_pb2_grpc as pb_grpc

from services.inference.worker import LoadReport, Worker

SERVICE_NAME = "tokenyard.inference.v1.WorkerService"
_PATHS = {"fast": pb.EXECUTION_PATH_FAST, "generic": pb.EXECUTION_PATH_GENERIC}
DEFAULT_INTERVAL_MS = 250
MIN_INTERVAL_MS = 10


def load_response(report: LoadReport) -> pb.WatchLoadResponse:
    """A load report as the proto message, stamped now."""
    stats = report.stats
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return pb.WatchLoadResponse(
        running=stats.running,
        queued=stats.queued,
        free_slots=max(stats.free_slots, 0),
        pending_tokens=stats.pending_tokens,
        tokens_per_second=stats.tokens_per_second,
        prefix_cache_hits=stats.prefix_cache_hits,
        prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_reused_tokens=stats.prefix_cache_reused_tokens,
        draining=report.draining,
        report_time=stamp,
        kv_cache_usage=stats.kv_cache_usage,
        queue_time_p50_seconds=report.queue_p50,
        queue_time_p95_seconds=report.queue_p95,
    )


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    """Describe, WatchLoad and Drain over `Worker`."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def Describe(self, request: pb.DescribeRequest, context: Any) -> pb.DescribeResponse:
        info = self.worker.info
        return pb.DescribeResponse(
            worker_id=self.worker.worker_id,
            model=info.model,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            max_running=info.max_running,
            max_queued=info.max_queued,
            device=info.device,
            dtype=info.dtype,
            version=info.version,
            prefix_cache=info.prefix_cache,
            execution_path=_PATHS.get(info.execution_path, pb.EXECUTION_PATH_UNSPECIFIED),
            model_revision=info.model_revision,
            quantization=info.quantization,
        )

    async def WatchLoad(
        self, request: pb.WatchLoadRequest, context: Any
    ) -> AsyncIterator[pb.WatchLoadResponse]:
        interval = max(request.interval_ms or DEFAULT_INTERVAL_MS, MIN_INTERVAL_MS) / 1000
        async for report in self.worker.load_reports(interval):
            yield load_response(report)

    async def Drain(self, request: pb.DrainRequest, context: Any) -> pb.DrainResponse:
        return pb.DrainResponse(remaining=self.worker.drain())
