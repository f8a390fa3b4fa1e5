"""The heartbeat and the reaper against a real Redis: leases that outlive a Redis outage, one
elected reaper that waits out an outage before it believes a missing lease, the rescue of
queued jobs whose Celery message was lost, and a beat that never waits for a model load."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from blaze_jobs.broker import queue_key, task_message
from blaze_jobs.heartbeat import Heartbeat, worker_key
from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.reaper import Reaper
from blaze_jobs.records import text
from blaze_jobs.settings import Settings
from blaze_jobs.store import JobStore
from tests.conftest import REDIS_URL, own_prefix, wait_until

pytestmark = pytest.mark.timeout(30)

LEASE_S = 3.0  # a beat is a second


@pytest.fixture()
def settings() -> Iterator[Settings]:
    # Shadows the session fixture: only a prefix of this test's own.
    with own_prefix("heartbeat") as prefix:
        yield Settings(redis_url=REDIS_URL, redis_prefix=prefix, visibility_timeout_s=5, lease_s=LEASE_S)


@pytest.fixture()
def store(settings: Settings) -> Iterator[JobStore]:
    client = redis.Redis.from_url(settings.redis_url)
    yield JobStore(client, settings)
    client.close()


class Clock:
    """The reaper's monotonic clock, moved by the test: what it measures is its own looks."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def queued(store: JobStore, *, age_s: float = 0) -> str:
    job_id = str(uuid.uuid4())
    store.create(
        new_record(
            job_id=job_id, tenant="default", engine="echo", model="builtin:echo", input={"n": 1}, created_at=time.time() - age_s
        )
    )
    return job_id


def running(store: JobStore, *, worker: str) -> str:
    """A job ``worker`` has taken: running, attempt 1, leased to ``<worker>:1``."""
    job_id = queued(store)
    store.take(job_id, worker=worker, lease_ms=int(LEASE_S * 1000))
    return job_id


def lease_of(store: JobStore, job_id: str) -> str | None:
    value = store.redis.get(store.keys.lease(job_id))
    return text(value) if value is not None else None


def message_ids(store: JobStore, settings: Settings) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in store.redis.lrange(queue_key(settings, "echo"), 0, -1)]


def test_a_lease_that_ran_out_while_redis_was_away_is_recreated_by_its_worker(store: JobStore) -> None:
    # Given a job running on w1, whose lease ran out inside Redis while w1 could not renew it
    heartbeat = Heartbeat(store=store, settings=store.settings, name="w1", state=dict)
    job_id = running(store, worker="w1")
    heartbeat.hold(job_id, "w1:1")
    store.redis.delete(store.keys.lease(job_id))

    # When w1 beats again
    heartbeat.beat()

    # Then the lease is w1's again, for a whole lease
    assert lease_of(store, job_id) == "w1:1"
    assert 0 < store.redis.pttl(store.keys.lease(job_id)) <= LEASE_S * 1000


def test_an_attempt_that_ends_leaves_the_lease_of_the_next_attempt_on_the_same_worker_renewed(store: JobStore) -> None:
    # Given a job w1 runs as attempt 1, reaped while w1 lived and taken again by w1 (attempt 2,
    # on another task thread)
    heartbeat = Heartbeat(store=store, settings=store.settings, name="w1", state=dict)
    job_id = running(store, worker="w1")
    heartbeat.hold(job_id, "w1:1")
    store.redis.delete(store.keys.lease(job_id))
    store.transition(job_id, allowed=(JobStatus.running,), to=JobStatus.queued, unleased=store.keys.lease(job_id))
    store.take(job_id, worker="w1", lease_ms=60_000)
    heartbeat.hold(job_id, "w1:2")

    # When the old attempt's thread lets its job go, and the lease then runs out
    heartbeat.release(job_id, "w1:1")
    store.redis.delete(store.keys.lease(job_id))
    heartbeat.beat()

    # Then the beat still renews attempt 2's lease (recreating it), so no reaper takes it
    assert lease_of(store, job_id) == "w1:2"


def test_a_stale_worker_neither_renews_nor_recreates_a_lease_it_lost(store: JobStore) -> None:
    # Given jobs w1 still believes it runs as attempt 1: one reaped and taken again by w2,
    # one reaped and taken by w2 whose lease then ran out too, one reaped and still queued
    stale = Heartbeat(store=store, settings=store.settings, name="w1", state=dict)
    jobs = [running(store, worker="w1") for _ in range(3)]
    for job_id in jobs:
        stale.hold(job_id, "w1:1")
        store.redis.delete(store.keys.lease(job_id))
        store.transition(job_id, allowed=(JobStatus.running,), to=JobStatus.queued, unleased=store.keys.lease(job_id))
    retaken, retaken_unleased, requeued = jobs
    store.take(retaken, worker="w2", lease_ms=60_000)
    store.take(retaken_unleased, worker="w2", lease_ms=60_000)
    store.redis.delete(store.keys.lease(retaken_unleased))

    # When w1 beats
    stale.beat()

    # Then w2's lease is untouched, and no lease is made for w1
    assert lease_of(store, retaken) == "w2:2"
    assert store.redis.pttl(store.keys.lease(retaken)) > LEASE_S * 1000
    assert lease_of(store, retaken_unleased) is None
    assert lease_of(store, requeued) is None


def test_one_elected_worker_reaps_a_dead_workers_job_a_beat_after_it_sees_the_lease_gone(store: JobStore) -> None:
    # Given two live workers' reapers, watching Redis without a break for a whole lease
    clock = Clock()
    first, second = (Reaper(store=store, settings=store.settings, name=n, clock=clock) for n in ("w1", "w2"))
    for _ in range(4):
        first.step()
        second.step()
        clock.now += 1
    assert (first.elected, second.elected) == (True, False)

    # When a job's worker dies and its lease runs out
    job_id = running(store, worker="dead")
    store.redis.delete(store.keys.lease(job_id))

    # Then the elected reaper sees it gone at one look and hands it back at the next one
    assert first.step() == 0 and second.step() == 0
    clock.now += 1
    assert second.step() == 0
    assert first.step() == 1
    record = store.get(job_id)
    assert (record["status"], record["attempts"]) == ("queued", "1")
    assert message_ids(store, store.settings) == [job_id]

    # and when the elected worker stops, the other one takes over at its next beat
    first.resign()
    second.step()
    assert second.elected


@pytest.mark.parametrize("break_in_redis", ["an error", "a command that waited out the outage"])
def test_after_losing_redis_the_reaper_waits_a_lease_so_live_workers_renew_first(store: JobStore, break_in_redis: str) -> None:
    # Given the elected reaper, watching for a while, and jobs running on a live worker w1
    # and on a dead one, whose leases both ran out while Redis was away
    clock = Clock()
    reaper = Reaper(store=store, settings=store.settings, name="w2", clock=clock)
    for _ in range(5):
        reaper.step()
        clock.now += 1
    alive = Heartbeat(store=store, settings=store.settings, name="w1", state=dict)
    live_job, dead_job = running(store, worker="w1"), running(store, worker="dead")
    alive.hold(live_job, "w1:1")
    for job_id in (live_job, dead_job):
        store.redis.delete(store.keys.lease(job_id))

    # When the reaper's Redis came back: after an error, or after one look that took the
    # whole outage (commands retry with back-off)
    if break_in_redis == "an error":
        reaper.lost_redis()
    clock.now += 15

    # Then for a lease it reaps nothing, while the live worker's beat recreates its lease
    for _ in range(3):
        assert reaper.step() == 0
        alive.beat()
        clock.now += 1
    # and only then the dead worker's job goes back to the queue, the live one keeps running
    assert reaper.step() == 1
    assert store.status(dead_job) == JobStatus.queued
    assert store.status(live_job) == JobStatus.running
    assert lease_of(store, live_job) == "w1:1"


@contextmanager
def held_unacked(settings: Settings, queue: str, count: int) -> Iterator[None]:
    """A kombu consumer takes ``count`` messages off ``queue`` and holds them unacknowledged
    (kombu restores them when the connection closes)."""
    with Connection(settings.redis_url, transport_options={"global_keyprefix": settings.redis_prefix}) as connection:
        consumer = connection.SimpleQueue(queue)
        for _ in range(count):
            consumer.get(timeout=5)
        yield


@pytest.mark.parametrize("in_flight", ["two webhook deliveries", "a running job"])
def test_a_queued_job_whose_message_is_nowhere_gets_a_fresh_one(store: JobStore, settings: Settings, in_flight: str) -> None:
    # Given old queued jobs: one with its message waiting, one whose message a worker holds
    # unacknowledged, one whose message was lost; and other messages unacknowledged as well
    # (webhook deliveries that Celery itself published, or a running job's)
    reaper = Reaper(store=store, settings=settings, name="w1")
    waiting, held, lost = (queued(store, age_s=60) for _ in range(3))
    store.redis.lpush(queue_key(settings, "echo"), task_message(job_id=held, engine="echo", input={"n": 1}))
    echo_held = 1
    if in_flight == "a running job":
        job_id = running(store, worker="w2")
        store.redis.lpush(queue_key(settings, "echo"), task_message(job_id=job_id, engine="echo", input={"n": 1}))
        echo_held, webhooks_held = 2, 0
    else:
        celery = Celery(broker=settings.redis_url, set_as_current=False)
        celery.conf.broker_transport_options = {"global_keyprefix": settings.redis_prefix}
        for n in range(2):
            celery.send_task("blaze.webhooks.deliver", args=[f"delivery-{n}"], queue="webhooks")
        webhooks_held = 2

    with held_unacked(settings, "echo", echo_held), held_unacked(settings, "webhooks", webhooks_held):
        store.redis.lpush(queue_key(settings, "echo"), task_message(job_id=waiting, engine="echo", input={"n": 1}))

        # When the reaper looks for lost messages
        rescued = reaper.rescue()

        # Then only the lost job gets a message, and it stays queued for a worker to take
        assert rescued == 1
        assert sorted(message_ids(store, settings)) == sorted([waiting, lost])
        assert store.status(lost) == JobStatus.queued
        # and once every queued job has a message, a look finds nothing
        assert reaper.rescue() == 0


def test_a_queued_job_whose_unacked_record_has_no_index_entry_gets_a_fresh_one(store: JobStore, settings: Settings) -> None:
    # Given an old queued job whose message a worker took and recorded as unacknowledged, but
    # without the record's index entry (Redis refused that write while the worker stopped),
    # so kombu will never restore it; and one whose message a consumer holds, recorded whole
    reaper = Reaper(store=store, settings=settings, name="w1")
    orphaned, held = (queued(store, age_s=60) for _ in range(2))
    message = json.loads(task_message(job_id=orphaned, engine="echo", input={"n": 1}))
    store.redis.hset(store.keys.unacked, "a-tag-without-index", json.dumps([message, "", "echo"]))
    store.redis.lpush(queue_key(settings, "echo"), task_message(job_id=held, engine="echo", input={"n": 1}))
    with held_unacked(settings, "echo", 1):
        # When the reaper looks for lost messages
        rescued = reaper.rescue()

        # Then the orphaned job gets a fresh message, and the held one none
        assert rescued == 1
        assert message_ids(store, settings) == [orphaned]
        assert store.status(orphaned) == JobStatus.queued


def test_a_young_queued_job_without_a_message_is_left_alone(store: JobStore, settings: Settings) -> None:
    # Given a queued job whose create may still be under way (younger than the visibility timeout)
    young = queued(store, age_s=0)

    # When the reaper looks for lost messages, Then it does not touch it
    assert Reaper(store=store, settings=settings, name="w1").rescue() == 0
    assert message_ids(store, settings) == []
    assert store.status(young) == JobStatus.queued


def test_a_worker_is_listed_at_start_and_again_at_once_when_its_state_changes(settings: Settings, store: JobStore) -> None:
    # Given a worker whose beats are 20 s apart
    slow = Settings(redis_url=settings.redis_url, redis_prefix=settings.redis_prefix, lease_s=60)
    state = {"breaker": "closed"}
    heartbeat = Heartbeat(store=store, settings=slow, name="w1", state=lambda: dict(state))

    def published() -> dict[str, Any] | None:
        raw = store.redis.get(worker_key(slow, "w1"))
        return json.loads(raw) if raw else None

    try:
        # When it starts, Then it is listed at once, not at its first beat
        heartbeat.start()
        assert wait_until(published, timeout=10, what="the worker's state")["breaker"] == "closed"
        # When its breaker opens, Then the listing shows it at once
        state["breaker"] = "open"
        heartbeat.publish_soon()
        wait_until(lambda: (published() or {}).get("breaker") == "open", timeout=10, what="the new breaker state")
    finally:
        heartbeat.stop()


def test_the_elected_reapers_scan_never_holds_up_its_beats(settings: Settings, store: JobStore) -> None:
    # Given a worker holding a running job, whose reaper is elected and whose rescue of lost
    # messages is slow (thousands of queued jobs to read, say)
    job_id = running(store, worker="w1")
    heartbeat = Heartbeat(store=store, settings=store.settings, name="w1", state=dict)
    heartbeat.hold(job_id, "w1:1")
    scanning, release = threading.Event(), threading.Event()
    looked_on: list[str] = []
    rescue = heartbeat.reaper.rescue

    def slow_rescue() -> int:
        looked_on.append(threading.current_thread().name)
        scanning.set()
        release.wait(10)
        return rescue()

    heartbeat.reaper.rescue = slow_rescue  # type: ignore[method-assign]
    try:
        # When it starts and its reaper is in the middle of a scan
        heartbeat.start()
        assert scanning.wait(10), "the reaper never looked"
        store.redis.delete(worker_key(store.settings, "w1"), store.keys.lease(job_id))
        heartbeat.publish_soon()

        # Then the beats go on meanwhile: the worker is listed and its lease renewed
        wait_until(lambda: store.redis.exists(worker_key(store.settings, "w1")), timeout=5, what="a beat during the scan")
        assert lease_of(store, job_id) == "w1:1"
        # And the scan ran on the reaper's own thread, not the heartbeat's
        assert looked_on[0] == "blaze-reaper"
    finally:
        release.set()
        heartbeat.stop()


@pytest.mark.timeout(90)  # importing torch on a busy machine
def test_a_beat_never_waits_for_a_model_load(store: JobStore, tmp_path: Path) -> None:
    from blaze_jobs.engines.llm import LLMEngine

    # Given a text engine loading a model (which holds the engine's lock for as long as it
    # takes), and a worker whose state lists the engine's models
    engine = LLMEngine(model_dir=tmp_path)
    heartbeat = Heartbeat(store=store, settings=store.settings, name="w1", state=lambda: {"models": engine.loaded_models()})
    job_id = running(store, worker="w1")
    heartbeat.hold(job_id, "w1:1")
    store.redis.delete(store.keys.lease(job_id))
    with engine._lock:  # a load in progress
        # When the worker beats, Then the beat ends (and the lease is there) during the load
        beat = threading.Thread(target=heartbeat.beat, daemon=True)
        beat.start()
        beat.join(timeout=20)
        assert not beat.is_alive(), "the beat waited for the model load"
    assert lease_of(store, job_id) == "w1:1"
