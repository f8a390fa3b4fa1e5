"""The Lua scripts and the key schema, fast, against fakeredis (which runs Lua through lupa,
with cjson, TIME and streams): a job's start and end, the webhook message the Lua fills in,
leases that only their owner drops, retries moved exactly once. The same scripts run against
a real Redis in test_store.py, test_heartbeat.py and test_webhooks.py."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from blaze_jobs import scripts
from blaze_jobs.broker import webhook_task_message, webhook_task_template
from blaze_jobs.deliveries import delivery_list
from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.keys import SCHEMA, WEBHOOK_QUEUE, Keys
from blaze_jobs.leases import LeaseKeeper
from blaze_jobs.records import text, transition_call
from blaze_jobs.settings import Settings
from blaze_jobs.store import JobStore
from blaze_jobs.webhook_retries import RetryMover, attempt_member

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = Settings(redis_prefix="t:", job_ttl_s=600)


@pytest.fixture()
def store() -> Iterator[JobStore]:
    client = fakeredis.FakeRedis()
    yield JobStore(client, SETTINGS)
    client.close()


def queued(store: JobStore, **record: str) -> str:
    job_id = str(uuid.uuid4())
    store.create(
        {
            **new_record(
                job_id=job_id, tenant="default", engine="echo", model="builtin:echo", input={"n": 1}, created_at=time.time()
            ),
            **record,
        }
    )
    return job_id


def events(store: JobStore, job_id: str) -> list[dict[str, str]]:
    entries: Any = store.redis.xrange(store.keys.stream(job_id))
    return [{text(k): text(v) for k, v in fields.items()} for _, fields in entries]


def test_a_job_taken_and_finished_moves_its_index_lease_and_events(store: JobStore) -> None:
    # Given a queued job
    job_id = queued(store)
    keys = store.keys

    # When a worker takes it
    record = store.take(job_id, worker="w1", lease_ms=30_000, started_at="1.5")

    # Then it runs attempt 1 under w1's lease, indexed as running, with a job.started event
    # holding the job as it stood, all but its input
    assert (record["status"], record["attempts"], record["worker"], record["started_at"]) == ("running", "1", "w1", "1.5")
    assert store.redis.get(keys.lease(job_id)) == b"w1:1"
    # (in the deployment's live indexes and its tenant's)
    for index in (keys.status, lambda status: keys.tenant_status("default", status)):
        assert store.redis.zscore(index("running"), job_id) is not None
        assert store.redis.zscore(index("queued"), job_id) is None
    (started,) = events(store, job_id)
    assert started["type"] == "job.started" and json.loads(started["job"])["attempts"] == "1"
    assert "input" not in json.loads(started["job"])
    # And the stream expires with the job, not later
    assert 0 < store.redis.pttl(keys.stream(job_id)) <= SETTINGS.job_ttl_s * 1000

    # When it succeeds, dropping its own lease
    store.transition(
        job_id,
        allowed=(JobStatus.running,),
        to=JobStatus.succeeded,
        attempts=1,
        release={"key": keys.lease(job_id), "owner": "w1:1"},
    )

    # Then the lease is gone, its tenant's index says succeeded (the deployment's live ones
    # hold it no more) and job.completed holds the end
    assert store.redis.exists(keys.lease(job_id)) == 0
    assert store.redis.zscore(keys.tenant_status("default", "succeeded"), job_id) is not None
    assert [store.redis.zscore(index, job_id) for index in keys.live_statuses] == [None, None]
    assert [e["type"] for e in events(store, job_id)] == ["job.started", "job.completed"]
    assert json.loads(events(store, job_id)[-1]["job"])["status"] == "succeeded"


def test_a_stale_attempt_cannot_drop_the_lease_of_the_attempt_that_replaced_it(store: JobStore) -> None:
    # Given a job taken by w1, handed back after its lease ran out, and taken again by w2
    job_id = queued(store)
    lease = store.keys.lease(job_id)
    store.take(job_id, worker="w1", lease_ms=30_000)
    store.redis.delete(lease)
    store.transition(job_id, allowed=(JobStatus.running,), to=JobStatus.queued, unleased=lease)
    store.take(job_id, worker="w2", lease_ms=30_000)

    # When w2's job is moved by an end that names w1's old lease (a release, not an attempt guard)
    store.transition(job_id, allowed=(JobStatus.running,), to=JobStatus.running, release={"key": lease, "owner": "w1:1"})

    # Then w2's lease stays
    assert store.redis.get(lease) == b"w2:2"


def test_a_canceled_text_job_ends_with_the_text_it_streamed(store: JobStore) -> None:
    # Given a running text job that streamed two pieces, its output but text kept on the job
    job_id = queued(store)
    store.take(job_id, worker="w1", lease_ms=30_000)
    append = scripts.script(store.redis, "append")

    for piece in ("Hello", " world"):
        append(
            keys=store.keys.event_keys(job_id),
            args=[
                "job.delta",
                json.dumps({"text": piece}),
                json.dumps({"partial_output": '{"usage":{"n":2}}'}),
                100,
                webhook_task_template(),
                600,
            ],
        )

    # When it is canceled with streamed=True (as the API cancels)
    script_keys, args = transition_call(
        store.keys,
        job_id,
        tenant="default",
        allowed=(JobStatus.running,),
        to=JobStatus.canceled,
        fields={},
        streamed=True,
        ttl=600,
    )
    store._transition(keys=script_keys, args=args)

    # Then its output is the streamed text, marked canceled, and job.completed carries it
    output = json.loads(store.get(job_id)["output"])
    assert output == {"usage": {"n": 2}, "text": "Hello world", "finish_reason": "canceled"}
    assert json.loads(json.loads(events(store, job_id)[-1]["job"])["output"])["text"] == "Hello world"


def test_the_webhook_message_lua_queues_is_the_one_broker_builds(store: JobStore) -> None:
    # Given a job whose webhook wants every event
    job_id = queued(store, webhook="https://example.com/hook", webhook_events="started,completed")

    # When it starts
    store.take(job_id, worker="w1", lease_ms=30_000)

    # Then one delivery is recorded, and the message queued for it is broker.py's, byte for byte
    (delivery,) = delivery_list(store.redis.hgetall(store.keys.deliveries(job_id)))
    assert delivery["type"] == "job.started" and delivery["state"] == "pending"
    (message,) = store.redis.lrange(store.keys.queue(WEBHOOK_QUEUE), 0, -1)
    assert text(message) == webhook_task_message(job_id=job_id, delivery_id=delivery["id"], attempt=1)
    # And the delivery records expire with the job
    assert 0 < store.redis.pttl(store.keys.deliveries(job_id)) <= SETTINGS.job_ttl_s * 1000


def test_a_due_retry_is_queued_once_by_two_movers(store: JobStore) -> None:
    # Given a delivery with a retry due now, and two webhook workers' movers
    job_id = queued(store, webhook="https://example.com/hook", webhook_events="started")
    store.take(job_id, worker="w1", lease_ms=30_000)
    queue = store.keys.queue(WEBHOOK_QUEUE)
    (delivery,) = delivery_list(store.redis.hgetall(store.keys.deliveries(job_id)))
    store.redis.delete(queue)
    now = time.time()
    store.redis.zadd(store.keys.webhook_retries, {attempt_member(job_id, delivery["id"], 2): now - 1})
    first, second = RetryMover(store.redis, SETTINGS), RetryMover(store.redis, SETTINGS)

    # When both look
    moved = [first.move_due(now=now), second.move_due(now=now)]

    # Then the retry is queued once, as attempt 2
    assert moved == [(1, None), (0, None)]
    (message,) = store.redis.lrange(queue, 0, -1)
    assert json.loads(message)["headers"]["id"] == f"{job_id}:{delivery['id']}:2"


def test_every_key_has_a_row_in_the_schema_and_the_docs() -> None:
    # Given the Keys methods and attributes and the schema table
    keys = Keys("p:")
    # (lists of keys whose rows are their members': the status indexes, the event keys)
    named = {n for n in vars(keys) if n not in ("prefix", "live_statuses")}
    lists = ("index_for", "event_keys", "tenant_statuses")
    named |= {n for n, v in vars(Keys).items() if callable(v) and not n.startswith("_") and n not in lists}

    # Then each key has a row, each row a key, and docs/redis.md lists every pattern
    assert named == set(SCHEMA)
    docs = (ROOT / "docs" / "redis.md").read_text()
    for info in SCHEMA.values():
        assert f"`{info.pattern}`" in docs, info.pattern


def test_no_script_builds_a_key() -> None:
    # Given every script's source
    lua = (ROOT / "blaze_jobs" / "lua").glob("*.lua")

    # Then none names a key prefix or joins a key of its own: keys come in KEYS
    for path in lua:
        code = "\n".join(line.split("--", 1)[0] for line in path.read_text().splitlines())
        assert "prefix" not in code, path.name
        assert not re.search(r"redis\.call\('\w+', ARGV", code), path.name


def test_a_worker_renews_its_leases_after_redis_forgot_the_script(store: JobStore) -> None:
    # Given a job w1 runs, whose lease ran out, and a Redis that has forgotten every script
    job_id = queued(store)
    store.take(job_id, worker="w1", lease_ms=30_000)
    store.redis.delete(store.keys.lease(job_id))
    store.redis.script_flush()
    keeper = LeaseKeeper(store.redis, store.keys, lease_s=30)
    keeper.hold(job_id, "w1:1")

    # When the worker renews what it holds
    assert keeper.renew() == 1

    # Then the lease is back, still w1's attempt 1
    assert store.redis.get(store.keys.lease(job_id)) == b"w1:1"
    assert 0 < store.redis.pttl(store.keys.lease(job_id)) <= 30_000
