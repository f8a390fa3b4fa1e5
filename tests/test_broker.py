"""The Celery message the API pushes with one LPUSH is the message Celery itself would send:
kombu decodes it, and a real Celery worker runs it."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Queue

from blaze_jobs.broker import DELIVER_TASK, SUMMARY_CHARS, queue_key, summary, task_message, task_name, webhook_task_message
from blaze_jobs.celery_app import app as blaze_app
from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.keys import WEBHOOK_QUEUE
from blaze_jobs.settings import Settings
from blaze_jobs.store import JobStore
from tests.conftest import REDIS_URL, own_prefix, wait_until

pytestmark = pytest.mark.timeout(60)

PROMPT = "a lighthouse at dusk"

# Headers that legitimately differ between two publishers: ``origin`` names the sending
# process (pid@host).
DIFFERENT_HEADERS = {"origin"}
# Headers Celery 5.3+ adds for task stamping and ``Task.replace``; the worker reads each with
# a default (``Request.stamped_headers``, ``.stamps``, ``.replaced_task_nesting``), so their
# absence is harmless. The strict test below still asks for them.
STAMPING_HEADERS = {"replaced_task_nesting", "stamped_headers", "stamps"}
# Properties that legitimately differ: Celery's ``reply_to`` is its result channel, unused
# with ``ignore_result``; the Redis transport draws a fresh ``delivery_tag`` per message.
DIFFERENT_PROPERTIES = {"reply_to", "delivery_tag"}


@pytest.fixture()
def prefix() -> Iterator[str]:
    """A key prefix of this test's own, deleted after."""
    with own_prefix("broker") as prefix:
        yield prefix


def sent_by_celery(prefix: str, *, job_id: str, engine: str, input: dict[str, Any], tenant: str) -> dict[str, Any]:
    """The envelope Celery's own ``send_task`` stores in Redis for the same job."""
    kwargs = {"summary": summary(input), "tenant": tenant}
    return celery_envelope(prefix, name=task_name(engine), args=[job_id], kwargs=kwargs, task_id=job_id, queue=engine)


def celery_envelope(
    prefix: str, *, name: str, args: list[str], kwargs: dict[str, Any], task_id: str, queue: str
) -> dict[str, Any]:
    """The envelope Celery's own ``send_task`` stores in Redis for a task."""
    celery = Celery("blaze-test-broker")
    celery.config_from_object("blaze_jobs.celeryconfig")
    celery.conf.broker_url = REDIS_URL
    celery.conf.broker_transport_options = {**celery.conf.broker_transport_options, "global_keyprefix": prefix}
    celery.conf.task_send_sent_event = False
    try:
        celery.send_task(name, args=args, kwargs=kwargs, task_id=task_id, queue=queue, ignore_result=True)
    finally:
        celery.close()
    with redis.Redis.from_url(REDIS_URL) as client:
        (raw,) = client.lrange(f"{prefix}{queue}", 0, -1)
    return json.loads(raw)


def body_of(envelope: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(envelope["body"]))


def test_the_message_is_the_one_celery_sends_for_the_same_job(prefix: str) -> None:
    # Given a diffusion job of tenant acme
    job_id = str(uuid.uuid4())
    input = {"prompt": PROMPT, "seed": 3}

    # When the API builds its message, and Celery sends the same task itself
    ours = json.loads(task_message(job_id=job_id, engine="diffusion", input=input, tenant="acme"))
    theirs = sent_by_celery(prefix, job_id=job_id, engine="diffusion", input=input, tenant="acme")

    # Then the envelopes have the same shape and encoding
    assert ours.keys() == theirs.keys()
    for name in ("content-type", "content-encoding"):
        assert ours[name] == theirs[name]
    # And the same headers, but for the ones that name the sender or stamping
    ignored = DIFFERENT_HEADERS | STAMPING_HEADERS
    assert {k: v for k, v in ours["headers"].items() if k not in ignored} == {
        k: v for k, v in theirs["headers"].items() if k not in ignored
    }
    # And the same properties (routing, persistence, priority, body encoding)
    assert {k: v for k, v in ours["properties"].items() if k not in DIFFERENT_PROPERTIES} == {
        k: v for k, v in theirs["properties"].items() if k not in DIFFERENT_PROPERTIES
    }
    # And the same decoded body: [args, kwargs (the tenant among them), embed]
    assert body_of(ours) == body_of(theirs) == [[job_id], {"summary": PROMPT, "tenant": "acme"}, body_of(theirs)[2]]


def test_the_headers_and_body_match_celerys_protocol_2_builder() -> None:
    # Given the headers and body Celery's protocol-2 builder makes for the job's task
    job_id = str(uuid.uuid4())
    input = {"prompt": PROMPT}
    built = blaze_app.amqp.as_task_v2(
        job_id, task_name("diffusion"), args=[job_id], kwargs={"summary": summary(input)}, ignore_result=True
    )

    # When the API builds its message
    ours = json.loads(task_message(job_id=job_id, engine="diffusion", input=input))

    # Then every header Celery sets is there with the same value (origin names the sender)
    ignored = DIFFERENT_HEADERS | STAMPING_HEADERS
    assert {k: v for k, v in ours["headers"].items() if k not in ignored} == {
        k: v for k, v in built.headers.items() if k not in ignored
    }
    assert ours["properties"]["correlation_id"] == built.properties["correlation_id"] == job_id
    # And the body is the same triple, as JSON sees it
    assert body_of(ours) == json.loads(json.dumps(list(built.body)))


def test_the_message_has_every_header_celery_sends() -> None:
    # Given Celery's own headers for the job's task
    job_id = str(uuid.uuid4())
    built = blaze_app.amqp.as_task_v2(job_id, task_name("echo"), args=[job_id], kwargs={"summary": "{}"}, ignore_result=True)

    # When the API builds its message, Then it has the same header names
    ours = json.loads(task_message(job_id=job_id, engine="echo", input={}))
    assert set(ours["headers"]) == set(built.headers)


def test_kombu_reads_the_pushed_message_as_a_celery_task(prefix: str) -> None:
    # Given the API's message pushed raw onto the echo queue under a fresh prefix
    job_id = str(uuid.uuid4())
    settings = Settings(redis_url=REDIS_URL, redis_prefix=prefix)
    with redis.Redis.from_url(REDIS_URL) as client:
        client.lpush(queue_key(settings, "echo"), task_message(job_id=job_id, engine="echo", input={"n": 1}))

    # When kombu's Redis transport takes it off the queue, as a worker's consumer would
    with Connection(REDIS_URL, transport_options={"global_keyprefix": prefix}) as connection:
        message = Queue("echo").bind(connection.default_channel).get(no_ack=True, accept=["json"])
        assert message is not None, "kombu found no message on the echo queue"
        body = message.decode()

    # Then it is a protocol-2 task message for the echo task, with the job id as task id
    assert message.content_type == "application/json"
    assert message.headers["task"] == "blaze.echo.generate"
    assert message.headers["id"] == message.properties["correlation_id"] == job_id
    assert message.delivery_info["routing_key"] == "echo"
    assert body == [[job_id], {"summary": '{"n":1}'}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def test_the_webhook_delivery_message_is_the_one_celery_sends(prefix: str) -> None:
    # Given a job's delivery, on its second attempt
    job_id, delivery_id = str(uuid.uuid4()), "1718000000000-0"
    task_id = f"{job_id}:{delivery_id}:2"

    # When broker.py builds its message (the template Lua fills), and Celery sends the same task
    ours = json.loads(webhook_task_message(job_id=job_id, delivery_id=delivery_id, attempt=2))
    theirs = celery_envelope(
        prefix, name=DELIVER_TASK, args=[job_id, delivery_id], kwargs={}, task_id=task_id, queue=WEBHOOK_QUEUE
    )
    built = blaze_app.amqp.as_task_v2(task_id, DELIVER_TASK, args=[job_id, delivery_id], kwargs={}, ignore_result=True)

    # Then the envelopes have the same shape and the same headers, but for the sender's name
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours["headers"].items() if k not in DIFFERENT_HEADERS} == {
        k: v for k, v in theirs["headers"].items() if k not in DIFFERENT_HEADERS
    }
    assert set(ours["headers"]) == set(built.headers)
    # And the same properties, but that the body is plain JSON (the ids go into it in Lua,
    # which has no base64), and the delivery tag is the task id
    assert "body_encoding" not in ours["properties"]
    assert ours["properties"]["delivery_tag"] == task_id
    ignored = DIFFERENT_PROPERTIES | {"body_encoding"}
    assert {k: v for k, v in ours["properties"].items() if k not in ignored} == {
        k: v for k, v in theirs["properties"].items() if k not in ignored
    }
    # And the same body: [args, kwargs, embed]
    assert json.loads(ours["body"]) == body_of(theirs) == json.loads(json.dumps(list(built.body)))


def test_kombu_reads_the_webhook_message_as_a_celery_task(prefix: str) -> None:
    # Given a delivery's message pushed raw onto the webhooks queue, as the Lua step does
    job_id, delivery_id = str(uuid.uuid4()), "1718000000000-0.1"
    with redis.Redis.from_url(REDIS_URL) as client:
        client.lpush(f"{prefix}{WEBHOOK_QUEUE}", webhook_task_message(job_id=job_id, delivery_id=delivery_id, attempt=1))

    # When kombu's Redis transport takes it off the queue
    with Connection(REDIS_URL, transport_options={"global_keyprefix": prefix}) as connection:
        message = Queue(WEBHOOK_QUEUE).bind(connection.default_channel).get(no_ack=True, accept=["json"])
        assert message is not None, "kombu found no message on the webhooks queue"
        body = message.decode()

    # Then it is the delivery task with the job and delivery as its arguments
    assert message.headers["task"] == DELIVER_TASK
    assert message.headers["id"] == message.properties["correlation_id"] == f"{job_id}:{delivery_id}:1"
    assert body == [[job_id, delivery_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


@pytest.mark.timeout(240)
def test_a_real_worker_runs_a_job_published_by_lpush(stack: dict[str, Any], settings: Settings) -> None:
    # Given a queued job record of tenant acme, and its message, naming the tenant, pushed
    # with one LPUSH (as the API does)
    job_id = str(uuid.uuid4())
    with redis.Redis.from_url(settings.redis_url) as client:
        store = JobStore(client, settings)
        store.create(
            new_record(
                job_id=job_id,
                tenant="acme",
                engine="echo",
                model="builtin:echo",
                input={"via": "lpush"},
                created_at=time.time(),
            )
        )
        message = task_message(job_id=job_id, engine="echo", input={"via": "lpush"}, tenant="acme")
        client.lpush(queue_key(settings, "echo"), message)

        # When the stack's echo worker (plain Celery) consumes its queue
        record = wait_until(
            lambda: (r := store.get(job_id))["status"] in ("succeeded", "failed") and r,
            timeout=20,
            what=f"job {job_id} to end",
        )

        # Then it ran the job once and recorded its output
        assert record["status"] == "succeeded", record
        assert json.loads(record["output"]) == {"via": "lpush"}
        assert record["attempts"] == "1"
        # And moved it between acme's status indexes (the message's tenant), out of the live ones
        indexed = [s.value for s in JobStatus if client.zscore(store.keys.tenant_status("acme", s.value), job_id) is not None]
        assert indexed == ["succeeded"]
        assert [client.zscore(index, job_id) for index in store.keys.live_statuses] == [None, None]


def test_summary_shortens_long_prompts_for_flower() -> None:
    # Given prompts shorter than, equal to and longer than the summary length
    short, exact, long = "a red fox", "x" * SUMMARY_CHARS, "a very detailed painting of " + "a lighthouse " * 10

    # Then short ones are kept and long ones cut to the summary length, ending in an ellipsis
    cut = long[: SUMMARY_CHARS - 1] + "…"
    assert summary({"prompt": short}) == short
    assert summary({"prompt": exact}) == exact
    assert summary({"prompt": long}) == cut and len(cut) == SUMMARY_CHARS < len(long)
    # And input without a prompt is summarized as its compact JSON, cut the same way
    assert summary({"n": 1}) == '{"n":1}'
    assert summary({"text": "y" * 200}) == '{"text":"' + "y" * (SUMMARY_CHARS - 10) + "…"
    # And the summary is what the message's kwargs carry
    message = json.loads(task_message(job_id="j", engine="diffusion", input={"prompt": long}))
    assert body_of(message)[1] == {"summary": cut}
    assert message["headers"]["kwargsrepr"] == repr({"summary": cut})
