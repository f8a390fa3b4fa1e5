"""Workers' inboxes against a real Redis: a job handed to a peer waits in that peer's inbox
alone; a dead worker's inbox goes back to the engine's queue, a live one's stays; and the
reaper's rescue counts a message in an inbox as present, so no job gets a second one."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from blaze_jobs import inboxes
from blaze_jobs.broker import queue_key, task_message
from blaze_jobs.jobs import new_record
from blaze_jobs.keys import Keys
from blaze_jobs.reaper import Reaper
from blaze_jobs.records import text
from blaze_jobs.settings import Settings
from blaze_jobs.store import JobStore
from tests.conftest import REDIS_URL, own_prefix

pytestmark = pytest.mark.timeout(30)

LEASE_S = 3.0


@pytest.fixture()
def settings() -> Iterator[Settings]:
    with own_prefix("inboxes") as prefix:
        yield Settings(redis_url=REDIS_URL, redis_prefix=prefix, visibility_timeout_s=5, lease_s=LEASE_S)


@pytest.fixture()
def store(settings: Settings) -> Iterator[JobStore]:
    client = redis.Redis.from_url(settings.redis_url)
    yield JobStore(client, settings)
    client.close()


def queued_job(store: JobStore, *, age_s: float = 0) -> str:
    job_id = str(uuid.uuid4())
    record = new_record(
        job_id=job_id, tenant="default", engine="echo", model="builtin:echo", input={"n": 1}, created_at=time.time() - age_s
    )
    store.create(record)
    return job_id


def beat(store: JobStore, name: str, *, age_s: float = 0) -> None:
    """``name``'s last heartbeat, ``age_s`` ago (as the heartbeat writes it)."""
    store.redis.zadd(store.keys.workers, {name: time.time() - age_s})


def ids_in(client: redis.Redis, key: str) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in client.lrange(key, 0, -1)]


def test_a_dead_workers_inbox_goes_back_to_the_queue_and_a_live_ones_stays(store: JobStore, settings: Settings) -> None:
    # Given a job handed to each of two workers: one beating, one silent for two leases
    live, dead = "echo-1@host", "echo-2@host"
    beat(store, live)
    beat(store, dead, age_s=2 * LEASE_S)
    to_live, to_dead = queued_job(store), queued_job(store)
    for job_id, worker in ((to_live, live), (to_dead, dead)):
        message = task_message(job_id=job_id, engine="echo", input={"n": 1}, faulted_on=["echo-9@host"])
        inboxes.hand_to(store.redis, settings, engine="echo", worker=worker, message=message)
    assert ids_in(store.redis, queue_key(settings, inboxes.inbox("echo", dead))) == [to_dead]
    assert ids_in(store.redis, queue_key(settings, "echo")) == []

    # When the reaper drains the inboxes of dead workers
    moved = inboxes.drain_dead(store.redis, settings)

    # Then the dead worker's job is back on the engine's queue, and the live one's is not
    assert moved == 1
    assert ids_in(store.redis, queue_key(settings, "echo")) == [to_dead]
    assert ids_in(store.redis, queue_key(settings, inboxes.inbox("echo", live))) == [to_live]
    # and only the live worker's inbox is still listed
    listed = {text(m) for m in store.redis.smembers(Keys(settings.redis_prefix).inboxes)}
    assert listed == {inboxes.inbox("echo", live)}
    assert inboxes.drain_dead(store.redis, settings) == 0


def test_a_worker_never_seen_counts_as_dead(store: JobStore, settings: Settings) -> None:
    # Given a job handed to a worker whose heartbeat is gone from the index (trimmed after a day)
    job_id = queued_job(store)
    message = task_message(job_id=job_id, engine="echo", input={"n": 1})
    inboxes.hand_to(store.redis, settings, engine="echo", worker="echo-3@host", message=message)
    # Then it goes back to the queue
    assert inboxes.drain_dead(store.redis, settings) == 1
    assert ids_in(store.redis, queue_key(settings, "echo")) == [job_id]


def test_the_rescue_counts_a_message_in_an_inbox_as_present(store: JobStore, settings: Settings) -> None:
    # Given an old queued job whose only message waits in a live worker's inbox
    beat(store, "echo-1@host")
    job_id = queued_job(store, age_s=60)
    message = task_message(job_id=job_id, engine="echo", input={"n": 1})
    inboxes.hand_to(store.redis, settings, engine="echo", worker="echo-1@host", message=message)
    # When the reaper looks for lost messages
    rescued = Reaper(store=store, settings=settings, name="w1").rescue()
    # Then the job gets no second message
    assert rescued == 0
    assert ids_in(store.redis, queue_key(settings, "echo")) == []
