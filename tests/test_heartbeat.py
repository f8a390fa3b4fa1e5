"""The heartbeat's rescue of queued jobs whose Celery message was lost in flight, against a
real Redis: a worker's BRPOP takes a message and records it as unacknowledged in a second
step, so Redis stopping between the two leaves a queued job with no message anywhere."""

from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

import pytest
import redis

from blaze_jobs.broker import queue_key, task_message
from blaze_jobs.heartbeat import Heartbeat
from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.settings import Settings
from blaze_jobs.store import JobStore
from tests.conftest import REDIS_URL, own_prefix

pytestmark = pytest.mark.timeout(15)


@pytest.fixture()
def settings() -> Iterator[Settings]:
    # Shadows the session fixture: only a prefix of this test's own.
    with own_prefix("heartbeat") as prefix:
        yield Settings(redis_url=REDIS_URL, redis_prefix=prefix, visibility_timeout_s=5)


@pytest.fixture()
def heartbeat(settings: Settings) -> Iterator[Heartbeat]:
    client = redis.Redis.from_url(settings.redis_url)
    yield Heartbeat(store=JobStore(client, settings), settings=settings, name="w1", state=dict)
    client.close()


def queued(heartbeat: Heartbeat, *, age_s: float) -> str:
    job_id = str(uuid.uuid4())
    heartbeat.store.create(new_record(job_id=job_id, engine="echo", model="builtin:echo", input={"n": 1}, created_at=time.time() - age_s))
    return job_id


def message_ids(client: redis.Redis, settings: Settings) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in client.lrange(queue_key(settings, "echo"), 0, -1)]


def test_a_queued_job_whose_message_is_nowhere_gets_a_fresh_one(heartbeat: Heartbeat, settings: Settings) -> None:
    client = heartbeat.redis
    # Given old queued jobs: one with its message waiting, one whose message a worker holds
    # unacknowledged (as kombu records it), one whose message was lost, and a young one
    # without a message (its create may still be under way)
    waiting, held, lost = (queued(heartbeat, age_s=60) for _ in range(3))
    young = queued(heartbeat, age_s=0)
    client.lpush(queue_key(settings, "echo"), task_message(job_id=waiting, engine="echo", input={"n": 1}))
    raw = json.loads(task_message(job_id=held, engine="echo", input={"n": 1}))
    client.hset(f"{settings.redis_prefix}unacked", "tag-1", json.dumps([raw, "", "echo"]))

    # When a worker's heartbeat looks for lost messages
    rescued = heartbeat.rescue()

    # Then only the lost job gets a message, and it stays queued for a worker to take
    assert rescued == 1
    assert sorted(message_ids(client, settings)) == sorted([waiting, lost])
    assert heartbeat.store.status(lost) == JobStatus.queued
    assert young not in message_ids(client, settings)
    # and once every queued job has a message, a look costs five counters and finds nothing
    client.lpush(queue_key(settings, "echo"), task_message(job_id=young, engine="echo", input={"n": 1}))
    assert heartbeat.rescue() == 0
