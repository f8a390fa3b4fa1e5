"""The echo engine: the output is the input, after ``sleep_ms``. It exercises the whole
queue (API, broker, worker, job records) without a model, for tests and benchmarks."""

from __future__ import annotations

import time
from typing import Any

from blaze_jobs.engines.base import Engine, EngineRequest
from blaze_jobs.errors import JobCanceled, RequestError, WorkerFault

#: How often a sleeping echo job looks for a cancel.
CANCEL_POLL_S = 0.01


class EchoEngine(Engine):
    name = "echo"
    batches = False

    def batch_key(self, request: EngineRequest) -> tuple:
        return (request.model,)

    def run_batch(self, requests: list[EngineRequest]) -> list[dict[str, Any] | BaseException]:
        return [self._echo(request) for request in requests]

    def _echo(self, request: EngineRequest) -> dict[str, Any] | BaseException:
        # "fail" lets anyone watch the breaker and retries work against a real worker.
        fail = request.input.get("fail")
        if fail == "worker":
            return WorkerFault("echo asked to fail as a worker fault")
        if fail == "request":
            return RequestError("echo asked to fail as a bad request")
        deadline = time.monotonic() + request.input.get("sleep_ms", 0) / 1000
        while (left := deadline - time.monotonic()) > 0:
            if request.should_stop():
                return JobCanceled(request.job_id)
            time.sleep(min(left, CANCEL_POLL_S))
        return dict(request.input)
