"""The job store against a real Redis: the Lua transition decides every race, counts
attempts, moves the status indexes and guards leases. Each test owns a fresh prefix."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from blaze_jobs.artifacts import UrlSigner
from blaze_jobs.errors import JobConflict, JobNotFound
from blaze_jobs.jobs import JobStatus, job_view, new_record
from blaze_jobs.settings import Settings
from blaze_jobs.store import AsyncJobStore, JobStore
from tests.conftest import REDIS_URL, own_prefix

pytestmark = pytest.mark.timeout(15)


@pytest.fixture()
def settings() -> Iterator[Settings]:
    # Shadows the session fixture: this module needs no stack, only a prefix of its own.
    with own_prefix("store") as prefix:
        yield Settings(redis_url=REDIS_URL, redis_prefix=prefix)


@pytest.fixture()
def store(settings: Settings) -> Iterator[JobStore]:
    client = redis.Redis.from_url(settings.redis_url)
    yield JobStore(client, settings)
    client.close()


def queued_job(store: JobStore, *, engine: str = "echo") -> str:
    job_id = str(uuid.uuid4())
    store.create(
        new_record(job_id=job_id, tenant="default", engine=engine, model="builtin:echo", input={"n": 1}, created_at=time.time())
    )
    return job_id


def start(store: JobStore, job_id: str) -> str:
    """What a worker does when it takes a job."""
    return store.transition(
        job_id, allowed=(JobStatus.queued,), to=JobStatus.running, count_attempt=True, started_at=repr(time.time())
    )


def finish(store: JobStore, job_id: str) -> str:
    """What a worker does when the job's run ended well."""
    return store.transition(
        job_id, allowed=(JobStatus.running,), to=JobStatus.succeeded, output='{"n":1}', completed_at=repr(time.time())
    )


def cancel(settings: Settings, job_id: str) -> None:
    """What the API does on ``POST /v1/jobs/{id}/cancel``."""

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            await AsyncJobStore(client, settings).cancel(job_id, tenant="default")
        finally:
            await client.aclose()

    asyncio.run(run())


def indexed_under(store: JobStore, job_id: str) -> list[str]:
    """The statuses the default tenant's indexes hold the job under."""
    keys = store.keys
    return [s.value for s in JobStatus if store.redis.zscore(keys.tenant_status("default", s.value), job_id) is not None]


def live_indexed_under(store: JobStore, job_id: str) -> list[str]:
    """The statuses the deployment's own (live) indexes hold the job under."""
    return [s.value for s in JobStatus if store.redis.zscore(store.keys.status(s.value), job_id) is not None]


def test_taking_a_job_marks_it_running_and_counts_an_attempt(store: JobStore) -> None:
    # Given a queued job
    job_id = queued_job(store)
    assert store.get(job_id)["attempts"] == "0"

    # When a worker takes it
    left = start(store, job_id)

    # Then it left queued, is running, and one attempt is counted with its start time
    record = store.get(job_id)
    assert left == "queued"
    assert record["status"] == "running"
    assert record["attempts"] == "1"
    assert float(record["started_at"]) >= float(record["created_at"])
    # And a second delivery of the same message cannot start it again
    with pytest.raises(JobConflict):
        start(store, job_id)
    assert store.get(job_id)["attempts"] == "1"


def test_a_cancel_that_lands_first_wins_over_the_workers_finish(store: JobStore, settings: Settings) -> None:
    # Given a running job
    job_id = queued_job(store)
    start(store, job_id)

    # When a client cancels it before the worker records its result
    cancel(settings, job_id)

    # Then the worker's finish is refused and the job stays canceled, with no output
    with pytest.raises(JobConflict, match="canceled"):
        finish(store, job_id)
    record = store.get(job_id)
    assert record["status"] == "canceled"
    assert "output" not in record
    assert json.loads(record["error"])["type"] == "canceled"


def test_a_job_that_ended_cannot_be_canceled(store: JobStore, settings: Settings) -> None:
    # Given a job a worker finished
    job_id = queued_job(store)
    start(store, job_id)
    finish(store, job_id)

    # When a client cancels it, Then that is a conflict and the job stays succeeded
    with pytest.raises(JobConflict, match="already ended"):
        cancel(settings, job_id)
    assert store.get(job_id)["status"] == "succeeded"


def test_moving_a_missing_job_raises_job_not_found(store: JobStore, settings: Settings) -> None:
    # Given no such job (never created, or expired)
    job_id = str(uuid.uuid4())

    # When a worker or a client tries to move it, Then it is not found, and nothing is created
    with pytest.raises(JobNotFound):
        start(store, job_id)
    with pytest.raises(JobNotFound):
        cancel(settings, job_id)
    with pytest.raises(JobNotFound):
        store.get(job_id)
    assert store.redis.exists(store.keys.job(job_id)) == 0
    assert indexed_under(store, job_id) == []


def test_the_status_indexes_follow_the_job(store: JobStore, settings: Settings) -> None:
    # Given a new job of the default tenant: its tenant indexes it as queued, under its
    # engine and among all its jobs; the deployment's live index holds it as queued
    keys = store.keys
    job_id = queued_job(store, engine="echo")
    assert indexed_under(store, job_id) == live_indexed_under(store, job_id) == ["queued"]
    assert store.redis.zscore(keys.tenant_engine("default", "echo"), job_id) is not None
    assert store.redis.zscore(keys.tenant_all("default"), job_id) is not None
    score = store.redis.zscore(keys.tenant_status("default", "queued"), job_id)
    assert store.redis.zscore(keys.status("queued"), job_id) == score

    # When it starts, Then it moves from queued to running in both, keeping its creation-time score
    start(store, job_id)
    assert indexed_under(store, job_id) == live_indexed_under(store, job_id) == ["running"]
    assert store.redis.zscore(keys.tenant_status("default", "running"), job_id) == score
    assert store.redis.zscore(keys.status("running"), job_id) == score

    # When it is canceled, Then its tenant holds it as canceled, with the engine and
    # all-jobs indexes; the deployment's live indexes let it go
    cancel(settings, job_id)
    assert indexed_under(store, job_id) == ["canceled"]
    assert live_indexed_under(store, job_id) == []
    assert store.redis.zscore(keys.tenant_engine("default", "echo"), job_id) == score
    assert store.redis.zscore(keys.tenant_all("default"), job_id) == score


def test_a_created_job_keeps_every_character_of_its_input_and_is_queued_and_indexed(store: JobStore, settings: Settings) -> None:
    # Given input with quotes, escapes, control characters and text outside ASCII
    job_input = {"prompt": 'é 漢字 🦊 "q" \\ \n \u2028 \u0000', "seed": 7}
    record = new_record(
        job_id=str(uuid.uuid4()), tenant="default", engine="echo", model="builtin:echo", input=job_input, created_at=time.time()
    )

    # When the API's create path stores it and pushes its message
    async def create() -> None:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            await AsyncJobStore(client, settings).create_queued(
                record, queue=f"{settings.redis_prefix}echo", message="the message"
            )
        finally:
            await client.aclose()

    asyncio.run(create())

    # Then the stored job is the record, byte for byte, queued, indexed, with a retention
    stored = store.get(record["id"])
    assert json.loads(stored["input"]) == job_input
    assert {name: stored[name] for name in record} == record
    assert indexed_under(store, record["id"]) == ["queued"]
    assert store.redis.zscore(store.keys.tenant_all("default"), record["id"]) == float(stored["score"])
    assert 0 < store.redis.ttl(store.keys.job(record["id"])) <= settings.job_ttl_s
    assert store.redis.lrange(f"{settings.redis_prefix}echo", 0, -1) == [b"the message"]


def test_jobs_of_the_same_microsecond_are_each_listed_once_across_pages(store: JobStore, settings: Settings) -> None:
    # Given five jobs created in the same microsecond (two API processes, a fast client)
    # between two older ones
    created_at = time.time()
    ids = []
    for offset in (-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0):
        job_id = str(uuid.uuid4())
        store.create(
            new_record(
                job_id=job_id, tenant="default", engine="echo", model="builtin:echo", input={}, created_at=created_at + offset
            )
        )
        ids.append(job_id)

    # When a client pages through the listing one, two and three jobs at a time
    async def every_page(limit: int) -> list[str]:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        listed, cursor = [], None
        try:
            while True:
                page, cursor = await AsyncJobStore(client, settings).list(
                    tenant="default", status=None, engine=None, limit=limit, cursor=cursor
                )
                listed += [record["id"] for record in page]
                if cursor is None:
                    return listed
        finally:
            await client.aclose()

    # Then every job comes exactly once, newest first, whatever the page size
    same_microsecond = sorted(ids[1:6], reverse=True)
    expected = [*same_microsecond, ids[6], ids[0]]
    for limit in (1, 2, 3):
        assert asyncio.run(every_page(limit)) == expected


def test_a_worker_takes_a_queued_job_in_one_step_and_only_once(store: JobStore, settings: Settings) -> None:
    # Given a queued job
    job_id = queued_job(store)

    # When a worker takes it
    record = store.take(job_id, worker="w1", lease_ms=30_000, started_at="1.5")

    # Then it gets the job as it now stands: running, first attempt, its lease held as w1:1
    assert (record["id"], record["status"], record["attempts"], record["worker"], record["started_at"]) == (
        job_id,
        "running",
        "1",
        "w1",
        "1.5",
    )
    assert json.loads(record["input"]) == {"n": 1}
    assert store.redis.get(store.keys.lease(job_id)) == b"w1:1"
    assert 0 < store.redis.pttl(store.keys.lease(job_id)) <= 30_000
    assert indexed_under(store, job_id) == ["running"]
    # and no other worker can take it again, nor take a job that does not exist
    with pytest.raises(JobConflict):
        store.take(job_id, worker="w2", lease_ms=30_000, started_at="2.5")
    with pytest.raises(JobNotFound):
        store.take(str(uuid.uuid4()), worker="w2", lease_ms=30_000, started_at="2.5")


def test_a_stale_attempt_drops_only_its_own_lease(store: JobStore) -> None:
    # Given a job w1 took, whose lease ran out, that was handed back and taken by w2
    job_id = queued_job(store)
    store.take(job_id, worker="w1", lease_ms=60_000)
    lease = store.keys.lease(job_id)
    store.redis.delete(lease)
    store.transition(job_id, allowed=(JobStatus.running,), to=JobStatus.queued, unleased=lease)
    store.take(job_id, worker="w2", lease_ms=60_000)

    # When w1's attempt ends late: its finish is refused, and it drops what it thinks is its lease
    with pytest.raises(JobConflict):
        store.transition(
            job_id, allowed=(JobStatus.running,), to=JobStatus.succeeded, attempts=1, release={"key": lease, "owner": "w1:1"}
        )
    assert store.release_lease(job_id, owner="w1:1") is False

    # Then w2 keeps its lease: nobody reaps the job it runs
    assert store.redis.get(lease) == b"w2:2"
    # and w2's own finish drops it
    store.transition(
        job_id, allowed=(JobStatus.running,), to=JobStatus.succeeded, attempts=2, release={"key": lease, "owner": "w2:2"}
    )
    assert store.redis.exists(lease) == 0
    assert store.get(job_id)["status"] == "succeeded"


def test_a_finish_keeps_a_lease_that_is_not_its_own(store: JobStore) -> None:
    # Given a running job whose lease names another attempt than the one finishing
    job_id = queued_job(store)
    store.take(job_id, worker="w1", lease_ms=60_000)
    lease = store.keys.lease(job_id)
    store.redis.set(lease, "w2:2")

    # When attempt 1 ends and releases its lease, Then the other attempt's lease stays
    store.transition(
        job_id, allowed=(JobStatus.running,), to=JobStatus.succeeded, attempts=1, release={"key": lease, "owner": "w1:1"}
    )
    assert store.redis.get(lease) == b"w2:2"


def test_a_jobs_events_expire_with_it_whatever_retention_the_worker_has(store: JobStore, settings: Settings) -> None:
    # Given a job with a webhook that the API created, and a worker with another BLAZE_JOB_TTL_S
    job_id = str(uuid.uuid4())
    record = new_record(
        job_id=job_id, tenant="default", engine="echo", model="builtin:echo", input={"n": 1}, created_at=time.time()
    )
    record.update(webhook="https://hooks.example.com/in", webhook_events="started,completed")

    async def create() -> None:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            await AsyncJobStore(client, settings).create_queued(record, queue=f"{settings.redis_prefix}echo", message="m")
        finally:
            await client.aclose()

    asyncio.run(create())
    worker = JobStore(store.redis, settings.model_copy(update={"job_ttl_s": 60}))

    # When the worker takes it: its job.started makes the stream and a webhook delivery
    worker.take(job_id, worker="w1", lease_ms=30_000)

    # Then the stream, deliveries and webhook order expire when the job does, at the deadline it carries
    keys = store.keys
    deadline = store.redis.pexpiretime(keys.job(job_id))
    assert deadline == int(store.get(job_id)["expires_at_ms"]) > (time.time() + 60) * 1000
    for key in (keys.stream(job_id), keys.deliveries(job_id), keys.webhook_order(job_id)):
        assert store.redis.pexpiretime(key) == deadline, key
    # and neither the event's job carries that bookkeeping, nor the job's view
    events: Any = store.redis.xrange(keys.stream(job_id))
    ((event_id, entry),) = events
    assert "expires_at_ms" not in json.loads(entry[b"job"])
    assert "expires_at_ms" not in job_view(store.get(job_id), base_url="http://api", signer=UrlSigner("s", ttl_s=60))
    # but the delivery's job does, so its webhook's artifact URLs expire with the job, not
    # when a webhook worker with another BLAZE_JOB_TTL_S would work it out
    delivered: Any = store.redis.hget(keys.deliveries(job_id), event_id + b":job")
    assert int(json.loads(delivered)["expires_at_ms"]) == deadline
    assert UrlSigner("s", ttl_s=60).expiry(json.loads(delivered)) == deadline // 1000


def test_a_job_born_ended_expires_with_its_stream(store: JobStore) -> None:
    # Given a job stored already succeeded (a cache hit) a while after its request came
    job_id = str(uuid.uuid4())
    record = new_record(
        job_id=job_id, tenant="default", engine="echo", model="builtin:echo", input={"n": 1}, created_at=time.time() - 5
    )
    record.update(status="succeeded", output='{"n":1}', completed_at=repr(time.time()), cache_hit="1")

    # When it is stored with its job.completed
    store.create(record)

    # Then the job and its stream expire together, at the job's own deadline
    keys = store.keys
    deadline = int(store.get(job_id)["expires_at_ms"])
    assert store.redis.pexpiretime(keys.job(job_id)) == store.redis.pexpiretime(keys.stream(job_id)) == deadline
