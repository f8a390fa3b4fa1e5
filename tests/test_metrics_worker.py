"""Worker metrics: a real echo worker serving ``--metrics-port`` counts the jobs it ran, their
times and batches, as Prometheus scrapes them; in process, the breaker's gauge and
transitions, the webhook deliveries' outcomes (an attempt whose record was lost is not
counted), the device's busy time (a run still going counts up to the scrape; echo jobs side
by side count once) and a batch's form wait (not its wait for a busy device)."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import REGISTRY

from blaze_jobs import metrics
from blaze_jobs.batching import Batcher, Result
from blaze_jobs.breaker import BreakerState, CircuitBreaker
from blaze_jobs.client import BlazeClient
from blaze_jobs.deliveries import deliveries_key
from blaze_jobs.engines.base import Engine, EngineRequest
from blaze_jobs.engines.echo import SPEC as ECHO
from blaze_jobs.engines.echo import EchoEngine
from blaze_jobs.engines.spec import Batching
from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.reaper import Reaper
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack, free_port
from blaze_jobs.store import JobStore
from blaze_jobs.webhook_retries import RetryMover
from blaze_jobs.worker import run_job
from blaze_jobs.worker_context import WorkerContext
from tests.conftest import REDIS_URL, own_prefix, start_api, wait_for_workers, wait_until
from tests.metrics_scrape import Samples, samples, value
from tests.receiver import Answer, Receiver
from tests.test_webhooks import OneDelivery, one_delivery, own  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(90)

JOBS = 4


def test_an_echo_worker_serves_the_metrics_of_the_jobs_it_ran(own_stack: Stack) -> None:
    # Given an API and an echo worker serving its metrics (through `blaze worker`)
    api_url = start_api(own_stack)
    port = free_port()
    own_stack.blaze("worker-echo", "worker", "--engine", "echo", "--metrics-port", str(port))
    wait_for_workers(api_url, 1)
    metrics_url = f"http://127.0.0.1:{port}/metrics"

    # When a few jobs run, each with a seed of its own (cacheable, never found in the cache)
    with BlazeClient(api_url) as api:
        ids = [api.submit("echo", {"n": i, "seed": uuid.uuid4().int % 1000_000})["id"] for i in range(JOBS)]
        assert all(api.wait(job_id, timeout=30)["status"] == "succeeded" for job_id in ids)

    # Then the worker's metrics count every job once, with its times and its batch
    echo = {"engine": "echo", "model": "builtin:echo"}

    def all_counted() -> Samples | None:
        found = samples(metrics_url)
        return found if value(found, "blaze_jobs_ended_total", engine="echo", status="succeeded") == JOBS else None

    found = wait_until(all_counted, timeout=10, what=f"{JOBS} succeeded jobs in {metrics_url}")
    assert value(found, "blaze_job_queue_wait_seconds_count", **echo) == JOBS
    assert value(found, "blaze_job_run_seconds_count", **echo) == JOBS
    # Echo jobs never share a batch: each ran as a batch of one.
    assert value(found, "blaze_batch_size_count", engine="echo") == JOBS
    assert value(found, "blaze_batch_size_sum", engine="echo") == JOBS
    # and, since echo never batches, no fill against --max-batch.
    assert value(found, "blaze_batch_fill_ratio_count", engine="echo") == 0
    for layer in ("local", "redis", "in_flight"):
        assert value(found, "blaze_cache_lookups_total", engine="echo", layer=layer, result="miss") == JOBS
    assert value(found, "blaze_breaker_state", engine="echo", state="closed") == 1
    assert value(found, "blaze_breaker_state", engine="echo", state="open") == 0
    assert ("blaze_device_busy_ratio", frozenset({("engine", "echo")})) in found
    assert 0 <= value(found, "blaze_device_busy_ratio", engine="echo") <= 1

    # And GET /v1/workers shows the device's busy share beside the breaker
    (worker,) = wait_for_workers(api_url, 1)
    assert 0 <= worker["device_busy"] <= 1 and worker["breaker"]["state"] == "closed"


def test_a_taken_metrics_port_stops_the_worker_naming_the_option(own_stack: Stack) -> None:
    port = free_port()
    first = own_stack.blaze("worker-first", "worker", "--engine", "webhooks", "--metrics-port", str(port))
    wait_until(lambda: _serves(port), timeout=30, what=f"the first worker's metrics on {port}")
    second = own_stack.blaze("worker-second", "worker", "--engine", "webhooks", "--metrics-port", str(port))
    assert second.process.wait(timeout=30) != 0
    assert f"--metrics-port {port}" in second.log_tail()
    assert first.process.poll() is None


def _serves(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --- in process -----------------------------------------------------------------------------


@pytest.fixture()
def recording() -> Iterator[None]:
    """Metrics recorded in this process for the test's length."""
    metrics.enable(True)
    try:
        yield
    finally:
        metrics.enable(False)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_breaker_shows_its_state_and_counts_its_transitions(recording: None) -> None:
    engine = f"test-{uuid.uuid4().hex[:8]}"  # labels of this test's own
    breaker = CircuitBreaker(failures=1, cooldown_s=0.05, max_cooldown_s=1, engine=engine)

    def state() -> dict[str, float]:
        return {s.value: sample("blaze_breaker_state", engine=engine, state=s.value) for s in BreakerState}

    def entered(to: BreakerState) -> float:
        return sample("blaze_breaker_transitions_total", engine=engine, to=to.value)

    assert state() == {"closed": 1, "open": 0, "half_open": 0}
    breaker.record_failure("device lost")
    assert state() == {"closed": 0, "open": 1, "half_open": 0} and entered(BreakerState.open) == 1
    wait_until(lambda: breaker.state is BreakerState.half_open, timeout=5, what="the breaker half-open")
    assert state() == {"closed": 0, "open": 0, "half_open": 1} and entered(BreakerState.half_open) == 1
    breaker.record_success()
    assert state() == {"closed": 1, "open": 0, "half_open": 0} and entered(BreakerState.closed) == 1
    breaker.close()


def test_webhook_attempts_count_by_outcome(recording: None, one_delivery: Any) -> None:  # noqa: F811
    event = "job.started"

    def counts() -> dict[str, float]:
        outcomes = ("delivered", "retry", "gone", "refused")
        found = {o: sample("blaze_webhook_deliveries_total", event=event, outcome=o) for o in outcomes}
        found["exhausted"] = sample("blaze_webhook_retries_exhausted_total", event=event)
        found["latency"] = sample("blaze_webhook_delivery_latency_seconds_count", event=event)
        return found

    def attempts(one: OneDelivery, count: int) -> list[str]:
        """``count`` attempts at a delivery, each retry made due (the clock skipped ahead)."""
        mover = RetryMover(one.client, one.settings)
        states = [one.deliver()]
        while len(states) < count:
            assert mover.move_due(now=time.time() + 3600)[0] == 1
            states.append(one.deliver())
        return states

    before = counts()
    # A delivery that fails once and then gets through; one refused to the schedule's end
    # (two retries: three attempts); one whose receiver says it is gone.
    assert attempts(one_delivery(Answer(500)), 2) == ["retrying", "succeeded"]
    assert attempts(one_delivery(Answer(500), Answer(500), Answer(500)), 3) == ["retrying", "retrying", "failed"]
    assert attempts(one_delivery(Answer(410)), 1) == ["gone"]
    after = counts()
    assert {k: after[k] - before[k] for k in after} == {
        "delivered": 1,
        "retry": 3,
        "gone": 1,
        "refused": 1,
        "exhausted": 1,
        "latency": 1,
    }


def test_a_webhook_attempt_whose_record_was_lost_is_not_counted(
    recording: None,
    one_delivery: Any,  # noqa: F811
    receiver: Receiver,
) -> None:
    # Given a delivery whose receiver takes its time to answer
    one = one_delivery(Answer(200, delay_s=0.3))
    before = sample("blaze_webhook_deliveries_total", event="job.started", outcome="delivered")
    attempt = ThreadPoolExecutor(1).submit(one.deliver)

    # When its claim passes to another worker while the POST is in flight (as when an attempt
    # outlives its deadline and is handed back)
    receiver.wait_for(one.hook, 1, timeout=10)
    one.client.hset(deliveries_key(one.settings.redis_prefix, one.job_id), f"{one.delivery_id}:claim", "another's")
    assert attempt.result(timeout=10) == "succeeded"

    # Then the attempt, not recorded on the job, is not counted either: it is sent again, and counted then
    assert one.record()["state"] == "pending"
    assert sample("blaze_webhook_deliveries_total", event="job.started", outcome="delivered") == before


def test_the_busy_window_is_the_device_share_of_the_last_window() -> None:
    now = [0.0]
    window = metrics.BusyWindow(window_s=8, clock=lambda: now[0])

    def ran(start: float, end: float) -> None:
        now[0] = start
        window.begin()
        now[0] = end
        window.end()

    # Given a run from 1 to 3 s: at 8 s, 2 of the 8 s so far were busy
    ran(1, 3)
    now[0] = 8
    assert window.ratio() == 0.25
    # When later runs come, the window moves on: at 16 s it holds 8 to 16, where the run
    # from 6 to 10 counts from 8 and the one from 10 to 14 whole
    ran(6, 10)
    ran(10, 14)
    now[0] = 16
    assert window.ratio() == 0.75
    # And a device idle for a window shows none
    now[0] = 30
    assert window.ratio() == 0.0 and window.busy_s() == 10


def test_a_run_still_going_counts_as_busy_up_to_the_scrape_and_overlapping_runs_once(recording: None) -> None:
    # Given a device watched by the metrics, idle for its first 4 s
    engine = f"test-{uuid.uuid4().hex[:8]}"
    now = [0.0]
    window = metrics.BusyWindow(window_s=8, clock=lambda: now[0])
    metrics.watch_device(engine, window)

    def scraped() -> tuple[float, float]:
        return sample("blaze_device_busy_seconds_total", engine=engine), sample("blaze_device_busy_ratio", engine=engine)

    # When a run begins at 4 s (a long generation), and a second joins it at 5 s
    now[0] = 4
    window.begin()
    now[0] = 5
    window.begin()
    # Then a scrape at 6 s, before either ended, shows the 2 s so far, once
    now[0] = 6
    assert scraped() == (2, 2 / 6)
    # and one at 8 s the 4 s so far, half the window
    now[0] = 8
    assert scraped() == (4, 0.5)
    # When the first ends at 9 s and the second at 10 s, Then the device was busy 6 s in all
    now[0] = 9
    window.end()
    now[0] = 10
    window.end()
    now[0] = 12
    assert scraped() == (6, 0.75)


class GatedEngine(Engine):
    """An engine whose batches (every request shares one batch key) run until the test opens its gate."""

    spec = dataclasses.replace(ECHO, name=f"test-gated-{uuid.uuid4().hex[:8]}", batching=Batching.static)

    def __init__(self) -> None:
        self.running, self.gate = threading.Event(), threading.Event()

    def batch_key(self, request: EngineRequest) -> tuple:
        return ("all",)

    def run_batch(self, requests: list[EngineRequest]) -> list[dict[str, Any] | BaseException]:
        self.running.set()
        assert self.gate.wait(timeout=10)
        return [request.input for request in requests]


def test_a_batch_that_waited_for_a_busy_device_records_only_its_form_wait(recording: None) -> None:
    # Given a batcher of two jobs a batch, with all the time in the world to fill one
    engine = GatedEngine()
    batcher = Batcher(engine, max_batch=2, max_wait_ms=60_000)
    form_wait = "blaze_batch_form_wait_seconds"

    def pair(n: int) -> tuple[list[Future[Result]], float]:
        """Two jobs, full at once: a batch due within the time it took to submit them."""
        first = time.monotonic()
        futures = [batcher.submit(EngineRequest(job_id=f"j{n}{i}", model="m", input={"n": i})) for i in range(2)]
        return futures, time.monotonic() - first

    try:
        # When a first batch holds the device, and a second one is full meanwhile
        first, submitted_in = pair(1)
        assert engine.running.wait(timeout=5)
        second, then_in = pair(2)
        time.sleep(0.2)  # the second, due, waits for the device
        engine.gate.set()
        assert [f.result(timeout=10).batch_size for f in first + second] == [2, 2, 2, 2]
    finally:
        batcher.close()

    # Then each batch's form wait is at most the time its jobs took to arrive, not the
    # 0.2 s the second then waited for the device
    assert sample(f"{form_wait}_count", engine=engine.name) == 2
    assert sample(f"{form_wait}_sum", engine=engine.name) <= submitted_in + then_in
    assert sample("blaze_batch_fill_ratio_sum", engine=engine.name) == 2


def test_echo_jobs_side_by_side_count_their_device_time_once_and_no_fill(recording: None) -> None:
    # Given an engine that never batches: its jobs run on their own task threads
    batcher = Batcher(EchoEngine(), max_batch=4, max_wait_ms=1)
    fills = sample("blaze_batch_fill_ratio_count", engine="echo")

    def run(i: int) -> Result:
        return batcher.submit(EngineRequest(job_id=f"e{i}", model="builtin:echo", input={"sleep_ms": 300})).result()

    sizes = sample("blaze_batch_size_count", engine="echo")
    try:
        # When two jobs of 0.3 s run at once
        began = time.monotonic()
        with ThreadPoolExecutor(2) as threads:
            jobs = [threads.submit(run, i) for i in range(2)]
            assert [job.result(timeout=10).batch_size for job in jobs] == [1, 1]
        wall = time.monotonic() - began
    finally:
        batcher.close()

    # Then the device was busy at least one job's time and at most the wall time (their
    # overlap counts once, not twice), and each counts as a batch of one with no fill
    assert 0.3 <= batcher.busy.busy_s() <= wall
    assert sample("blaze_batch_size_count", engine="echo") == sizes + 2
    assert sample("blaze_batch_fill_ratio_count", engine="echo") == fills


def test_the_reaper_counts_the_job_it_failed_and_a_retry_waits_from_its_requeue(recording: None) -> None:
    with own_prefix("metrics-reaper") as prefix:
        settings = Settings(redis_url=REDIS_URL, redis_prefix=prefix, lease_s=3.0, max_attempts=2)
        store = JobStore(redis.Redis.from_url(REDIS_URL), settings)
        echo = {"engine": "echo", "model": "builtin:echo"}
        before = {
            "failed": sample("blaze_jobs_ended_total", engine="echo", status="failed"),
            "waits": sample("blaze_job_queue_wait_seconds_count", **echo),
            "waited": sample("blaze_job_queue_wait_seconds_sum", **echo),
        }

        # Given two jobs created 100 s ago whose worker died: one on its first attempt of
        # two, one on its last
        def taken(attempts: int) -> str:
            job_id = str(uuid.uuid4())
            created = time.time() - 100
            store.create(
                new_record(job_id=job_id, tenant="default", engine="echo", model="builtin:echo", input={}, created_at=created)
            )
            lease = store.keys.lease(job_id)
            for attempt in range(attempts):
                if attempt:
                    store.transition(job_id, allowed=(JobStatus.running,), to=JobStatus.queued, unleased=lease)
                store.take(job_id, worker="dead", lease_ms=3000, started_at=repr(created))
                store.redis.delete(lease)
            return job_id

        retried, last = taken(1), taken(2)

        # When the elected reaper has watched for a lease and reaps them
        now = [1000.0]
        reaper = Reaper(store=store, settings=settings, name="reaper", clock=lambda: now[0])
        reaping = time.time()
        reaped = 0
        for _ in range(5):
            reaped += reaper.step()
            now[0] += 1
        assert reaped == 2 and store.status(last) is JobStatus.failed and store.status(retried) is JobStatus.queued

        # Then the job it failed has ended, as counted: no worker will count it
        assert sample("blaze_jobs_ended_total", engine="echo", status="failed") == before["failed"] + 1

        # When a worker runs the other one again
        context = WorkerContext(settings, engine="echo", name="metrics-test")
        try:
            assert run_job(retried, engine="echo", context=context) == "succeeded"
        finally:
            context.close()
            store.redis.close()
        ran = time.time()

        # Then its attempt waited from its return to the queue, not from its creation 100 s ago
        assert sample("blaze_job_queue_wait_seconds_count", **echo) == before["waits"] + 1
        assert 0 <= sample("blaze_job_queue_wait_seconds_sum", **echo) - before["waited"] <= ran - reaping
