"""The echo engine: the output is the input, after ``sleep_ms``. It exercises the whole
queue (API, broker, worker, job records) without a model, for tests and benchmarks."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from blaze_jobs.engines.base import Engine, EngineRequest, request_territory
from blaze_jobs.engines.spec import Batching, Bound, BuiltinModel, EngineSpec, JSONInt
from blaze_jobs.errors import JobCanceled, RequestError, WorkerFault

if TYPE_CHECKING:
    from blaze_jobs.settings import Settings

#: How often a sleeping echo job looks for a cancel.
CANCEL_POLL_S = 0.01


class EchoInput(BaseModel):
    """Input of an echo job: any fields, returned unchanged as the output. For smoke tests
    and benchmarks of the queue itself."""

    model_config = ConfigDict(extra="allow", strict=True)

    sleep_ms: JSONInt = Field(0, ge=0, description="Wait this long before answering (bounded by BLAZE_MAX_SLEEP_MS).")


class EchoSettings(BaseModel):
    echo_model: str = "builtin:echo"
    #: The echo engine sleeps at most this long (it exists for tests and benchmarks).
    max_sleep_ms: int = 60_000


def _create(settings: Settings, *, device: str | None = None, max_batch: int | None = None) -> EchoEngine:
    return EchoEngine()


def _cacheable(input: dict[str, Any]) -> bool:
    # A "fail" job exists to fail: a cached success would hide the failure it asks for.
    return "seed" in input and "fail" not in input


SPEC = EngineSpec(
    name="echo",
    input_model=EchoInput,
    description="An echo job: the output is the input.",
    batching=Batching.none,
    create=_create,
    settings=EchoSettings,
    default_model_setting="echo_model",
    input_optional=True,
    bounds=(Bound(EchoInput, "sleep_ms", "max_sleep_ms", "ms"),),
    cacheable=_cacheable,
    # The wait never changes the output.
    not_output=frozenset({"sleep_ms"}),
    builtin_models=(BuiltinModel(id="builtin:echo", revision="1"),),
)


class EchoEngine(Engine):
    spec = SPEC

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
