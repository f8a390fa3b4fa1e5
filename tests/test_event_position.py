"""A job's record names its latest event, so a waiter reads the job and where to read its
events on from with one HGETALL; an attempt's end drops its own lease with one command; the
API's one event reader stops reading a stream once its job ended. Against a real Redis, the
commands watched with MONITOR (filtered by this test's keys: other tests share the server)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from blaze_jobs import events
from blaze_jobs.api.event_reader import EventReader
from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.records import text
from blaze_jobs.settings import Settings
from blaze_jobs.store import JobStore
from tests.conftest import REDIS_URL, own_prefix

pytestmark = pytest.mark.timeout(30)


@pytest.fixture()
def settings() -> Iterator[Settings]:
    # Shadows the session fixture: this module needs no stack, only a prefix of its own.
    with own_prefix("position") as prefix:
        yield Settings(redis_url=REDIS_URL, redis_prefix=prefix)


@pytest.fixture()
def store(settings: Settings) -> Iterator[JobStore]:
    client = redis.Redis.from_url(settings.redis_url)
    yield JobStore(client, settings)
    client.close()


def queued_job(store: JobStore, **fields: str) -> str:
    job_id = str(uuid.uuid4())
    record = new_record(
        job_id=job_id, tenant="default", engine="echo", model="builtin:echo", input={"n": 1}, created_at=time.time()
    )
    store.create({**record, **fields})
    return job_id


def last_event_id(store: JobStore, job_id: str) -> str:
    entries: Any = store.redis.xrevrange(store.keys.stream(job_id), count=1)
    return text(entries[0][0])


def job_and_position(settings: Settings, job_id: str) -> tuple[dict[str, str], str]:
    async def read() -> tuple[dict[str, str], str]:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            return await events.job_and_position(client, prefix=settings.redis_prefix, job_id=job_id)
        finally:
            await client.aclose()

    return asyncio.run(read())


def commands_during(work: Callable[[], Any], *, about: str) -> list[tuple[str, str]]:
    """(client type, command) of every command naming ``about`` that Redis ran during ``work``;
    client type ``lua`` for a command a script ran."""
    seen: list[tuple[str, str]] = []
    marker = f"end-of-watch-{uuid.uuid4().hex}"
    listening = threading.Event()

    def listen() -> None:
        client = redis.Redis.from_url(REDIS_URL)
        with client.monitor() as monitor:
            listening.set()
            for command in monitor.listen():
                if marker in command["command"]:
                    break
                if about in command["command"]:
                    seen.append((command["client_type"], command["command"]))
        client.close()

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert listening.wait(5), "MONITOR did not start"
    try:
        work()
    finally:
        marking = redis.Redis.from_url(REDIS_URL)
        marking.echo(marker)
        marking.close()
        thread.join(10)
    return seen


def test_each_event_leaves_its_id_on_the_job_and_one_hgetall_reads_both(store: JobStore, settings: Settings) -> None:
    # Given a job just queued: no event yet, so its events are read from the stream's start
    job_id = queued_job(store)
    assert job_and_position(settings, job_id)[1] == "0-0"

    # When a worker takes it, reports progress and finishes it
    store.take(job_id, worker="w1", lease_ms=30_000, started_at=repr(time.time()))
    started = last_event_id(store, job_id)
    assert store.get(job_id)["event"] == started
    progress = events.append_event(
        store.redis,
        prefix=settings.redis_prefix,
        job_id=job_id,
        kind="job.progress",
        fields={"progress": '{"step":1,"total":2}'},
        job_fields={"progress": '{"step":1,"total":2}'},
        settings=settings,
    )
    assert store.get(job_id)["event"] == progress and store.get(job_id)["progress"] == '{"step":1,"total":2}'
    record, position = job_and_position(settings, job_id)
    assert position == progress and "event" not in record and record["status"] == "running"
    store.transition(
        job_id,
        allowed=(JobStatus.running,),
        to=JobStatus.succeeded,
        attempts=1,
        release={"key": store.keys.lease(job_id), "owner": "w1:1"},
        output='{"n":1}',
    )

    # Then the job names its job.completed, whose snapshot is the job without that field
    completed = last_event_id(store, job_id)
    record, position = job_and_position(settings, job_id)
    assert position == completed and record["status"] == "succeeded" and "event" not in record
    entries: Any = store.redis.xrange(store.keys.stream(job_id))
    snapshot = json.loads(entries[-1][1][b"job"])
    assert snapshot["status"] == "succeeded" and "event" not in snapshot
    # and a waiter reads the job and its position with one command, an HGETALL
    sent = commands_during(lambda: job_and_position(settings, job_id), about=job_id)
    assert sent == [("tcp", f"HGETALL {store.keys.job(job_id)}")]


def test_a_job_born_ended_names_its_job_completed(store: JobStore, settings: Settings) -> None:
    # Given a job stored already succeeded (a cache hit)
    job_id = queued_job(store, status="succeeded", output='{"n":1}', cache_hit="1")

    # Then its record names its one event, job.completed
    record, position = job_and_position(settings, job_id)
    assert position == last_event_id(store, job_id) and record["status"] == "succeeded"


def test_a_job_whose_record_does_not_name_its_last_event_is_read_with_its_stream(store: JobStore, settings: Settings) -> None:
    # Given a running job whose record was written before records named their latest event
    job_id = queued_job(store)
    store.take(job_id, worker="w1", lease_ms=30_000)
    store.redis.hdel(store.keys.job(job_id), "event")

    # Then its position is its stream's last entry, not the stream's start (no event is repeated)
    record, position = job_and_position(settings, job_id)
    assert position == last_event_id(store, job_id) and record["status"] == "running"


def test_an_attempts_end_drops_its_own_lease_with_one_command(store: JobStore) -> None:
    # Given a job w1 runs as attempt 1
    job_id = queued_job(store)
    store.take(job_id, worker="w1", lease_ms=30_000)
    lease = store.keys.lease(job_id)

    # When the attempt ends, guarded by its number
    def end() -> None:
        store.transition(
            job_id, allowed=(JobStatus.running,), to=JobStatus.succeeded, attempts=1, release={"key": lease, "owner": "w1:1"}
        )

    sent = commands_during(end, about=lease)

    # Then its lease is gone, by one GETDEL (no GET then DEL)
    assert store.redis.exists(lease) == 0
    assert [command.split()[0] for _, command in sent] == ["EVALSHA", "GETDEL"]


def test_a_release_without_the_attempts_guard_still_compares_before_it_deletes(store: JobStore) -> None:
    # Given a job w1 runs as attempt 1
    job_id = queued_job(store)
    store.take(job_id, worker="w1", lease_ms=30_000)
    lease = store.keys.lease(job_id)

    # When a move releases the lease without naming the attempt
    def move() -> None:
        store.transition(job_id, allowed=(JobStatus.running,), to=JobStatus.running, release={"key": lease, "owner": "w1:1"})

    sent = commands_during(move, about=lease)

    # Then the lease was read before it was dropped
    assert [command.split()[0] for _, command in sent] == ["EVALSHA", "GET", "DEL"]
    assert store.redis.exists(lease) == 0


def test_the_reader_stops_reading_a_stream_once_its_job_ended(store: JobStore, settings: Settings) -> None:
    # Given the API's event reader and a waiter on a queued job
    first, second = queued_job(store), queued_job(store)

    async def scenario() -> tuple[list[str], list[str]]:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        reader = EventReader(settings, client)
        await reader.start()
        try:
            seen_first: list[str] = []
            async with reader.watch(first, after="0-0") as feed:
                await asyncio.sleep(0.1)  # the reader blocks on the job's stream
                await asyncio.to_thread(run_and_finish, store, first)
                while events.COMPLETED not in seen_first:
                    batch = await feed.next_events(10)
                    assert batch, f"no job.completed; saw {seen_first}"
                    seen_first += [event.type for event in batch]
            await asyncio.sleep(0.2)  # time for a read after the end, if there were one
            # When another job is waited on and runs
            seen_second: list[str] = []
            async with reader.watch(second, after="0-0") as feed:
                await asyncio.to_thread(run_and_finish, store, second)
                while events.COMPLETED not in seen_second:
                    batch = await feed.next_events(10)
                    assert batch, f"no job.completed; saw {seen_second}"
                    seen_second += [event.type for event in batch]
            return seen_first, seen_second
        finally:
            await reader.close()
            await client.aclose()

    result: list[Any] = []
    sent = commands_during(lambda: result.append(asyncio.run(scenario())), about="")
    seen_first, seen_second = result[0]

    # Then each waiter saw its job's events, in order
    assert seen_first == ["job.started", "job.completed"] and seen_second == ["job.started", "job.completed"]
    # and the ended job's stream was not read on from its job.completed: no read blocked on it
    # for the second waiter to interrupt (MONITOR does not show CLIENT UNBLOCK, an admin command)
    first_stream = store.keys.stream(first)
    reads_of_first = [command for _, command in sent if command.startswith("XREAD") and first_stream in command]
    assert reads_of_first, "the reader never read the first job's stream"
    assert not [command for command in reads_of_first if f"{first_stream} {last_event_id(store, first)}" in command]


def run_and_finish(store: JobStore, job_id: str) -> None:
    """What a worker does: take the job, then end it well."""
    store.take(job_id, worker="w1", lease_ms=30_000)
    time.sleep(0.05)
    store.transition(
        job_id,
        allowed=(JobStatus.running,),
        to=JobStatus.succeeded,
        attempts=1,
        release={"key": store.keys.lease(job_id), "owner": "w1:1"},
    )
