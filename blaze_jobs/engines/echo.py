"""The echo engine: the output is the input, after ``sleep_ms``. It exercises the whole
queue (API, broker, worker, job records) without a model, for tests and benchmarks."""

from __future__ import annotations

import time
from typing import Any

from blaze_jobs.engines.base import Engine, EngineRequest, request_territory
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
        # 1. Read the input: a value the engine cannot use is the request's fault.
        try:
            with request_territory("echo input"):
                fail = request.input.get("fail")
                sleep_s = float(request.input.get("sleep_ms", 0)) / 1000
                output = dict(request.input)
        except RequestError as error:
            return error
        # 2. "Run on the device". "fail" lets anyone watch the breaker and retries work
        #    against a real worker: as a worker fault, a bad request, or an engine bug (an
        #    exception of no Blaze kind, which counts as the worker's like any other there).
        if fail == "worker":
            return WorkerFault("echo asked to fail as a worker fault")
        if fail == "request":
            return RequestError("echo asked to fail as a bad request")
        if fail == "bug":
            raise ValueError("echo asked to fail as an engine bug")
        deadline = time.monotonic() + sleep_s
        while (left := deadline - time.monotonic()) > 0:
            if request.should_stop():
                return JobCanceled(request.job_id)
            time.sleep(min(left, CANCEL_POLL_S))
        return output
