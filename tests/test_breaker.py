"""Worker faults: retries elsewhere up to BLAZE_MAX_ATTEMPTS, and each worker's circuit
breaker (open, a peer takes over, half-open probe, close or reopen longer), against real
echo workers asked to fail with ``"fail": "worker"``."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

import blaze_jobs.worker_context as worker_context
from blaze_jobs import inboxes
from blaze_jobs.broker import queue_key, task_message
from blaze_jobs.client import BlazeClient
from blaze_jobs.engines.base import EngineRequest
from blaze_jobs.errors import RequestError, WorkerFault
from blaze_jobs.jobs import new_record
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from blaze_jobs.worker import run_job
from blaze_jobs.worker_context import WorkerContext, current_context, install_context
from tests.conftest import AUTH, REDIS_URL, own_prefix, start_api, wait_for_workers, wait_until

pytestmark = pytest.mark.timeout(150)

# A cool-down long enough for a peer to start and take the waiting job first.
FAST_BREAKER = {"BLAZE_BREAKER_FAILURES": "2", "BLAZE_BREAKER_COOLDOWN_S": "6", "BLAZE_LEASE_S": "3"}


def worker_named(api_url: str, prefix: str) -> dict[str, Any] | None:
    workers = httpx.get(f"{api_url}/v1/workers", timeout=5, headers=AUTH).json()["workers"]
    return next((w for w in workers if w["name"].startswith(prefix)), None)


def breaker_of(api_url: str, child_pid: int) -> dict[str, Any] | None:
    worker = worker_named(api_url, f"echo-{child_pid}@")
    return worker["breaker"] if worker else None


def serve_on_both(client: BlazeClient, pids: tuple[int, ...], *, timeout: float = 60) -> None:
    """Run pairs of jobs until each worker has run one: a worker is listed before it consumes."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while not all(any(name.startswith(f"echo-{pid}@") for name in seen) for pid in pids):
        assert time.monotonic() < deadline, f"not every worker ran a job; saw {seen}"
        ids = [client.submit("echo", {"sleep_ms": 500})["id"] for _ in pids]
        seen |= {client.wait(job_id, timeout=30)["worker"] for job_id in ids}


def test_a_job_that_faults_on_two_workers_is_its_own_fault_and_alone_one_is_retried(own_stack: Stack) -> None:
    # Given two echo workers whose breakers stay closed, three attempts per job, and beats
    # each second (GET /v1/workers shows the breakers' counts as of the last beat)
    env = {"BLAZE_MAX_ATTEMPTS": "3", "BLAZE_BREAKER_FAILURES": "100", "BLAZE_LEASE_S": "3"}
    api_url = start_api(own_stack, **env)
    first, second = (own_stack.blaze(f"echo-{n}", "worker", "--engine", "echo", "--concurrency", "1", **env) for n in range(2))
    wait_for_workers(api_url, 2)

    def faults(pid: int) -> int:
        return (breaker_of(api_url, pid) or {}).get("total_failures", 0)

    with BlazeClient(api_url) as client:
        serve_on_both(client, (first.pid, second.pid))
        # When a job meets a worker fault on each worker it runs on (a poison job)
        poison = client.wait(client.submit("echo", {"fail": "worker"})["id"], timeout=60)
        # Then it failed once it had faulted on both: the request's fault, naming both workers
        assert poison["status"] == "failed" and poison["attempts"] == 2, (poison["error"], poison["worker"])
        assert poison["error"]["type"] == "request"
        assert f"echo-{first.pid}@" in poison["error"]["message"] and f"echo-{second.pid}@" in poison["error"]["message"]
        # and only its first fault counted, against the first worker it met
        wait_until(lambda: faults(first.pid) + faults(second.pid) == 1, timeout=10, what="one fault in all")
        time.sleep(2)  # two beats later, still one
        assert faults(first.pid) + faults(second.pid) == 1
        before = faults(first.pid)

        # When such a job comes while one worker is left
        second.stop()
        wait_until(
            lambda: len(httpx.get(f"{api_url}/v1/workers", timeout=5, headers=AUTH).json()["workers"]) == 1,
            timeout=30,
            what="one worker",
        )
        alone = client.wait(client.submit("echo", {"fail": "worker"})["id"], timeout=60)
        # Then it ran three times and failed as a worker fault, naming why and where
        assert alone["status"] == "failed" and alone["attempts"] == 3
        assert alone["error"]["type"] == "worker_fault"
        message = alone["error"]["message"]
        assert "3 attempts" in message and "echo asked to fail" in message and f"echo-{first.pid}@" in message
        # and the job counted once against the worker's breaker
        wait_until(lambda: faults(first.pid) == before + 1, timeout=10, what="one more fault")
        # while a bad request failed once, as the request's fault
        bad = client.wait(client.submit("echo", {"fail": "request"})["id"], timeout=30)
        assert (bad["status"], bad["attempts"], bad["error"]["type"]) == ("failed", 1, "request")
        # and the worker still serves good jobs
        assert client.wait(client.submit("echo", {"ok": True})["id"], timeout=30)["status"] == "succeeded"


def test_the_breaker_opens_a_peer_takes_over_and_a_probe_closes_it(own_stack: Stack) -> None:
    env = {**FAST_BREAKER, "BLAZE_MAX_ATTEMPTS": "1"}
    api_url = start_api(own_stack, **env)
    first = own_stack.blaze("echo-a", "worker", "--engine", "echo", "--concurrency", "1", **env)
    wait_for_workers(api_url, 1)

    with BlazeClient(api_url) as client:
        # Given a worker that meets two worker faults in a row (a bad request does not count)
        client.wait(client.submit("echo", {"fail": "request"})["id"], timeout=30)
        for _ in range(2):
            assert client.wait(client.submit("echo", {"fail": "worker"})["id"], timeout=30)["status"] == "failed"

        # Then its breaker opens and it stops taking jobs: a good job waits in the queue
        wait_until(lambda: (breaker_of(api_url, first.pid) or {}).get("state") == "open", timeout=10, what="breaker open")
        waiting = client.submit("echo", {"n": 1})
        time.sleep(1)
        assert client.get(waiting["id"])["status"] == "queued"

        # When a healthy peer starts, it takes the job over
        peer = own_stack.blaze("echo-b", "worker", "--engine", "echo", "--concurrency", "1", **env)
        taken = client.wait(waiting["id"], timeout=60)
        assert taken["status"] == "succeeded" and taken["worker"].startswith(f"echo-{peer.pid}@")
        peer.stop()

        # After the cool-down the first worker is half-open; a probe that faults reopens it
        # with twice the cool-down
        wait_until(lambda: (breaker_of(api_url, first.pid) or {}).get("state") == "half_open", timeout=15, what="half-open")
        assert client.wait(client.submit("echo", {"fail": "worker"})["id"], timeout=30)["status"] == "failed"
        breaker = wait_until(
            lambda: (b := breaker_of(api_url, first.pid)) and b["state"] == "open" and b, timeout=10, what="reopened"
        )
        assert breaker["times_opened"] == 2 and breaker["cooldown_s"] == 12

        # and once half-open again, a good probe closes it
        wait_until(lambda: (breaker_of(api_url, first.pid) or {}).get("state") == "half_open", timeout=25, what="half-open")
        assert client.wait(client.submit("echo", {"n": 2})["id"], timeout=30)["status"] == "succeeded"
        wait_until(lambda: (breaker_of(api_url, first.pid) or {}).get("state") == "closed", timeout=10, what="closed")
        assert client.wait(client.submit("echo", {"n": 3})["id"], timeout=30)["status"] == "succeeded"


# --- in one process: two worker contexts on a real Redis, jobs run by ``run_job`` itself -------


@contextmanager
def worker_contexts(*names: str, engine: str = "echo", **options: Any) -> Iterator[list[WorkerContext]]:
    """Worker contexts named ``names`` sharing a key prefix of their own on the test Redis."""
    with own_prefix("breaker") as prefix:
        settings = Settings(redis_url=REDIS_URL, redis_prefix=prefix, **options)
        made = [WorkerContext(settings, engine=engine, name=name) for name in names]
        try:
            yield made
        finally:
            for context in made:
                context.batcher.close()
                context.breaker.close()


def queued_job(context: WorkerContext, input: dict[str, Any], *, engine: str = "echo") -> str:
    """Store a queued job (as the API does, less the message); returns its id."""
    job_id = str(uuid.uuid4())
    model = context.settings.default_model(engine)
    context.store.create(
        new_record(job_id=job_id, tenant="default", engine=engine, model=model, input=input, created_at=time.time())
    )
    return job_id


def message_of(context: WorkerContext, job_id: str, *, engine: str = "echo", queue: str | None = None) -> dict[str, Any]:
    """Where the job's message waits in its queue (0: taken last; the engine's unless
    ``queue`` names another) and its keyword arguments."""
    queue = queue_key(context.settings, queue or engine)
    messages = [json.loads(m) for m in context.redis.lrange(queue, 0, -1)]
    for position, message in enumerate(messages):
        if message["headers"]["id"] == job_id:
            _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            return {"position": position, "of": len(messages), "kwargs": kwargs}
    raise AssertionError(f"no message of {job_id} in {queue}")


def test_a_job_that_faults_on_a_second_worker_fails_as_its_own_fault_and_opens_no_breaker() -> None:
    with worker_contexts("worker-a", "worker-b", max_attempts=3, breaker_failures=2) as (a, b):
        # Given healthy jobs waiting, and a job that faults every worker it meets
        waiting = [queued_job(a, {"n": n}) for n in range(3)]
        for job_id in waiting:
            a.redis.lpush(queue_key(a.settings, "echo"), task_message(job_id=job_id, engine="echo", input={}))
        poison = queued_job(a, {"fail": "worker"})

        # When it faults on the first worker
        assert run_job(poison, engine="echo", context=a) == "queued"
        # Then it counts once against that worker, the record names the worker, and its
        # message waits behind the jobs already queued (kombu takes from the right end)
        assert a.breaker.snapshot()["total_failures"] == 1
        assert json.loads(a.store.get(poison)["faulted_on"]) == ["worker-a"]
        where = message_of(a, poison)
        assert where["position"] == 0 and where["of"] == 4 and where["kwargs"]["faulted_on"] == ["worker-a"]

        # When the first worker draws it again while a peer is live
        b.heartbeat.beat()
        assert run_job(poison, engine="echo", context=a, faulted_on=["worker-a"]) == "handed_back"
        # Then it leaves it, untouched, in the peer's inbox, for the peer to run next
        record = a.store.get(poison)
        assert (record["status"], record["attempts"]) == ("queued", "1")
        assert message_of(a, poison, queue=inboxes.inbox("echo", "worker-b"))["kwargs"]["passes"] == 1

        # When it faults on the peer too
        assert run_job(poison, engine="echo", context=b, faulted_on=["worker-a"], passes=1) == "failed"
        # Then it failed as the request's fault, naming both workers, and the peer's breaker
        # did not count it
        error = json.loads(b.store.get(poison)["error"])
        assert error["type"] == "request" and "worker-a" in error["message"] and "worker-b" in error["message"]
        assert b.breaker.snapshot()["total_failures"] == 0
        assert a.breaker.snapshot()["times_opened"] == b.breaker.snapshot()["times_opened"] == 0


def test_a_job_counts_once_against_a_worker_that_faults_it_again_and_every_job_faulting_opens_it() -> None:
    with worker_contexts("worker-a", max_attempts=3, breaker_failures=2) as (a,):
        # Given a worker alone, and a job that faults each time it runs
        poison = queued_job(a, {"fail": "worker"})
        # When it runs there on all its attempts
        statuses = [run_job(poison, engine="echo", context=a, faulted_on=["worker-a"] if n else []) for n in range(3)]
        # Then it fails as a worker fault on that worker, counted once: the breaker stays closed
        assert statuses == ["queued", "queued", "failed"]
        error = json.loads(a.store.get(poison)["error"])
        assert error["type"] == "worker_fault" and "3 attempts on worker-a" in error["message"]
        assert a.breaker.snapshot()["total_failures"] == 1 and a.breaker.state.value == "closed"

        # When two different jobs fault in a row (a faulty device faults every job)
        for _ in range(2):
            run_job(queued_job(a, {"fail": "worker"}), engine="echo", context=a)
        # Then the breaker opens
        assert a.breaker.state.value == "open"


def test_faults_are_classified_by_where_they_happen_not_by_their_type() -> None:
    with worker_contexts("worker-a", max_attempts=3) as (a,):
        # Given an echo input nested deeper than Python's recursion limit allows to recurse
        deep: dict[str, Any] = {}
        inner = deep
        for _ in range(500):
            inner["a"] = {}
            inner = inner["a"]
        # When it runs, Then it is echoed, and no fault counts against the worker
        job_id = queued_job(a, {"deep": deep})
        assert run_job(job_id, engine="echo", context=a) == "succeeded"
        assert json.loads(a.store.get(job_id)["output"]) == {"deep": deep}

        # Given an input the engine cannot read (not a number of milliseconds)
        job_id = queued_job(a, {"sleep_ms": "soon"})
        # Then the request fails, once, as its own fault
        assert run_job(job_id, engine="echo", context=a) == "failed"
        assert json.loads(a.store.get(job_id)["error"])["type"] == "request"
        assert a.breaker.snapshot()["total_failures"] == 0

        # Given an engine bug on the device (a ValueError there is no request's fault)
        job_id = queued_job(a, {"fail": "bug"})
        # Then it is a worker fault: counted against the breaker, and the job runs again
        assert run_job(job_id, engine="echo", context=a) == "queued"
        assert a.breaker.snapshot()["total_failures"] == 1
        assert "ValueError" in a.breaker.snapshot()["last_reason"]


def test_a_diffusion_error_on_the_device_is_the_workers_whatever_its_type(tmp_path: Path) -> None:
    from blaze_jobs.engines.diffusion import DiffusionEngine
    from blaze_jobs.engines.diffusion_input import _resolve

    engine = DiffusionEngine(model_dir=tmp_path, device="cpu")
    request = EngineRequest(job_id="j", model="builtin:tiny-sd", input={"prompt": "a lighthouse", "seed": 1})
    job = _resolve(request, default_size=(64, 64))
    # A ValueError raised by the pipeline, past the checks of the request: an engine bug
    assert isinstance(engine._fault(ValueError("tensor shapes differ"), job), WorkerFault)
    # while the same error while the request is read is the request's
    with pytest.raises(RequestError):
        _resolve(EngineRequest(job_id="k", model="m", input={"prompt": "p", "guidance_scale": "x"}), default_size=(64, 64))
    with pytest.raises(RequestError, match="at most 1000"):
        _resolve(
            EngineRequest(job_id="k", model="m", input={"prompt": "p", "num_inference_steps": 5000}),
            default_size=(64, 64),
            max_steps=1000,
        )


def test_each_engine_has_its_own_context_in_a_process() -> None:
    with worker_contexts("echo-worker") as (echo,), worker_contexts("llm-worker", engine="llm") as (llm,):
        install_context(echo)
        install_context(llm)
        try:
            assert current_context("echo") is echo and current_context("llm") is llm
        finally:
            worker_context._contexts.clear()


def test_a_job_waiting_for_the_device_when_its_worker_stops_goes_back_uncounted(model_dir: Path) -> None:
    with worker_contexts("worker-a", engine="diffusion", max_attempts=3, model_dir=model_dir) as (a,):
        # Given a (batching) worker shutting down
        a.batcher.close()
        # When a job it had taken reaches its batcher
        job_id = queued_job(a, {"prompt": "a lighthouse", "seed": 1, "num_inference_steps": 2}, engine="diffusion")
        assert run_job(job_id, engine="diffusion", context=a) == "queued"
        # Then the job is queued again with its attempt given back, no fault on its record
        # (it would fail as poison at its next worker fault), none against the breaker
        record = a.store.get(job_id)
        assert record["attempts"] == "0" and not record.get("faulted_on"), record
        assert a.breaker.snapshot()["total_failures"] == 0
        assert message_of(a, job_id, engine="diffusion")["kwargs"].get("faulted_on", []) == []
