"""Webhooks: signed per Standard Webhooks, delivered in order by their own worker, retried
with back-off, stopped by 410, recorded attempt by attempt, and never sent to private
addresses unless allowed. A real receiver on 127.0.0.1 checks every signature with the
``standardwebhooks`` reference library."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any, cast

import pytest
import redis
from fastapi.testclient import TestClient
from kombu import Connection
from standardwebhooks import Webhook

from blaze_jobs import addresses, signing, tasks, webhook_retries, webhooks
from blaze_jobs.api.app import create_app
from blaze_jobs.celery_app import app as celery_app
from blaze_jobs.deliveries import deliveries_key, delivery_list
from blaze_jobs.events import DELIVER_TASK, append_event, stream_key
from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.progress import ProgressReporter
from blaze_jobs.settings import Settings
from blaze_jobs.store import JobStore
from tests.conftest import ADMIN_TOKEN, AUTH, REDIS_URL, own_prefix
from tests.receiver import Answer, Receiver, path

# Generous: the first test to use the stack also waits for it to start.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def own() -> Iterator[Settings]:
    """Settings under a key prefix of this test's own (no stack serves it), deleted after."""
    with own_prefix("webhooks") as prefix:
        yield Settings(redis_url=REDIS_URL, redis_prefix=prefix, webhook_retry_schedule=[0.2, 0.5], admin_token=ADMIN_TOKEN)


def create_job(store: JobStore, **fields: str) -> str:
    job_id = str(uuid.uuid4())
    record = new_record(
        job_id=job_id, tenant="default", engine="echo", model="builtin:echo", input={"n": 1}, created_at=time.time()
    )
    store.create({**record, **fields})
    return job_id


def started_job(client: redis.Redis, settings: Settings, webhook: str) -> str:
    """A running job whose webhook wants ``job.started``: one delivery, pending."""
    store = JobStore(client, settings)
    job_id = create_job(store, webhook=webhook, webhook_events="started")
    store.transition(job_id, allowed=(JobStatus.queued,), to=JobStatus.running)
    return job_id


def stream_entries(client: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    # This client does not decode replies: ids, field names and values are bytes.
    return cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(key))


def only_delivery(client: redis.Redis, settings: Settings, job_id: str) -> dict[str, Any]:
    """The job's one delivery, as ``GET /v1/jobs/{id}/deliveries`` shows it."""
    (delivery,) = delivery_list(client.hgetall(deliveries_key(settings.redis_prefix, job_id)))
    return delivery


@dataclass
class OneDelivery:
    """A running job with one pending delivery, and a webhook worker's ``Deliverer``."""

    client: redis.Redis
    settings: Settings
    deliverer: webhooks.Deliverer
    job_id: str
    delivery_id: str
    hook: str

    def deliver(self) -> str:
        return self.deliverer.deliver(self.job_id, self.delivery_id)

    def record(self) -> dict[str, Any]:
        return only_delivery(self.client, self.settings, self.job_id)


@pytest.fixture()
def one_delivery(own: Settings, receiver: Receiver) -> Iterator[Callable[..., OneDelivery]]:
    """``one_delivery(*answers, url=None, **settings)``: a delivery to a receiver path of its
    own answered with ``answers`` (or to ``url``), private addresses allowed unless told."""
    made: list[OneDelivery] = []

    def make(*answers: Answer, url: str | None = None, **update: Any) -> OneDelivery:
        settings = own.model_copy(update={"webhook_allow_private": True, **update})
        client, hook = redis.Redis.from_url(REDIS_URL), path()
        receiver.answer(hook, *answers)
        job_id = started_job(client, settings, url or receiver.url(hook))
        delivery_id = only_delivery(client, settings, job_id)["id"]
        made.append(OneDelivery(client, settings, webhooks.Deliverer(settings, client=client), job_id, delivery_id, hook))
        return made[-1]

    yield make
    for one in made:
        one.deliverer.close()
        one.client.close()


# --- signing ------------------------------------------------------------------------------


def test_signatures_interoperate_with_the_standard_webhooks_library() -> None:
    # Given a secret and a body
    secret = signing.new_secret()
    body = b'{"type":"job.completed","data":{"id":"j1"}}'

    # When we sign, the reference library verifies; when it signs, we verify
    headers = signing.signed_headers(secret, msg_id="msg_1", body=body)
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    theirs = Webhook(secret).sign("msg_2", datetime.now(tz=timezone.utc), body.decode())
    ours = {"webhook-id": "msg_2", "webhook-timestamp": str(int(time.time())), "webhook-signature": theirs}
    assert signing.verify(secret, ours, body)["type"] == "job.completed"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b.replace(b"j1", b"j2")),
        lambda h, b: ({**h, "webhook-id": "msg_other"}, b),
        lambda h, b: ({**h, "webhook-signature": "v1," + "A" * 44}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),
    ],
    ids=["body", "id", "signature", "missing header"],
)
def test_a_tampered_webhook_fails_verification(tamper: Any) -> None:
    secret = signing.new_secret()
    body = b'{"data":{"id":"j1"}}'
    headers, body = tamper(signing.signed_headers(secret, msg_id="msg_1", body=body), body)
    with pytest.raises(signing.WebhookVerificationError):
        signing.verify(secret, headers, body)


def test_a_stale_timestamp_fails_verification() -> None:
    secret = signing.new_secret()
    headers = signing.signed_headers(secret, msg_id="msg_1", body=b"{}", timestamp=int(time.time()) - 600)
    with pytest.raises(signing.WebhookVerificationError, match="five minutes"):
        signing.verify(secret, headers, b"{}")


# --- retries ------------------------------------------------------------------------------


def test_retry_delays_follow_the_schedule_with_jitter_and_retry_after() -> None:
    rng = random.Random(7)
    schedule = [5.0, 30.0, 120.0]
    delays = [webhook_retries.retry_delay(n, schedule, rng=rng) for n in (1, 2, 3)]
    for delay, planned in zip(delays, schedule, strict=True):
        assert delay is not None and planned * 0.8 <= delay <= planned * 1.2
    # The schedule spent, the delivery has failed; a longer Retry-After wins, a shorter does not
    assert webhook_retries.retry_delay(4, schedule) is None
    assert webhook_retries.retry_delay(1, schedule, retry_after=90) == 90
    shortest = webhook_retries.retry_delay(1, schedule, retry_after=1, rng=rng)
    assert shortest is not None and shortest >= 4
    assert webhook_retries.parse_retry_after("120") == 120
    in_a_minute = webhook_retries.parse_retry_after(formatdate(time.time() + 60, usegmt=True))
    assert in_a_minute is not None and 55 <= in_a_minute <= 60
    assert webhook_retries.parse_retry_after("soon") is None


def test_a_retry_is_queued_once_when_due(own: Settings) -> None:
    # Given a delivery whose second attempt is scheduled for a second from now
    client = redis.Redis.from_url(REDIS_URL)
    job_id = started_job(client, own, "http://127.0.0.1:9/h")
    delivery = only_delivery(client, own, job_id)
    client.delete(own.key("webhooks"))  # the first attempt's message
    mover = webhook_retries.RetryMover(client, own)
    now = time.time()
    client.zadd(webhook_retries.retries_key(own), {f"{job_id} {delivery['id']} 2": now + 1})

    # Then it stays until due, is queued once when due, and the mover knows when to look next
    assert mover.move_due(now=now) == (0, pytest.approx(now + 1))
    assert mover.move_due(now=now + 1.01) == (1, None)
    assert mover.move_due(now=now + 2) == (0, None)
    (raw,) = client.lrange(own.key("webhooks"), 0, -1)
    headers = json.loads(raw)["headers"]
    assert headers["task"] == DELIVER_TASK and headers["id"] == f"{job_id}:{delivery['id']}:2"
    client.close()


def test_a_receiver_that_stays_down_is_retried_for_about_a_day_then_the_delivery_fails(
    one_delivery: Callable[..., OneDelivery], receiver: Receiver
) -> None:
    # Given the default retry schedule and a receiver that answers 500 to everything
    schedule = Settings.model_fields["webhook_retry_schedule"].get_default(call_default_factory=True)
    one = one_delivery(*[Answer(500)] * (len(schedule) + 1), webhook_retry_schedule=schedule)
    mover = webhook_retries.RetryMover(one.client, one.settings)

    # When a webhook worker makes each attempt as it comes due (the clock skipped ahead)
    waits_s: list[float] = []
    while (state := one.deliver()) == "retrying":
        delivery = one.record()
        due = datetime.fromisoformat(delivery["next_attempt_at"]).timestamp()
        waits_s.append(due - datetime.fromisoformat(delivery["attempts"][-1]["at"]).timestamp())
        assert mover.move_due(now=due + 0.001)[0] == 1
        assert len(waits_s) <= len(schedule), "the delivery never gave up"

    # Then the receiver had about a day to come back, each wait longer than the first, and
    # then the delivery failed with every attempt on record
    assert state == "failed"
    assert 20 <= sum(waits_s) / 3600 <= 28, waits_s
    assert min(waits_s) == waits_s[0] < 10 and max(waits_s) > 6 * 3600, waits_s
    assert [a["status_code"] for a in one.record()["attempts"]] == [500] * (len(waits_s) + 1)
    assert len(receiver.received(one.hook)) == len(waits_s) + 1


def test_a_duplicate_message_does_not_send_a_delivery_twice(one_delivery: Callable[..., OneDelivery], receiver: Receiver) -> None:
    # Given a delivery being sent to a receiver that takes half a second to answer
    one = one_delivery(Answer(200, delay_s=0.5))
    states: list[str] = []
    sending = threading.Thread(target=lambda: states.append(one.deliver()))
    sending.start()
    receiver.wait_for(one.hook, 1, timeout=10)

    # When the same task message comes again while it is in flight, and after it succeeded
    # (as Redis hands back a message whose worker it did not hear from)
    during = one.deliver()
    sending.join(timeout=10)
    after = one.deliver()

    # Then the receiver heard once, and the record shows one attempt
    assert (during, states, after) == ("duplicate", ["succeeded"], "succeeded")
    assert len(receiver.received(one.hook)) == 1
    assert [a["status_code"] for a in one.record()["attempts"]] == [200]


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_timeout(one_delivery: Callable[..., OneDelivery]) -> None:
    # Given a receiver that sends its answer a byte at a time, each well within the timeout
    one = one_delivery(Answer(200, trickle_s=0.25), webhook_timeout_s=1.0)

    # When a webhook worker sends the delivery
    state = one.deliver()

    # Then the attempt ended at the receiver's timeout, long before the answer would have
    # (so it ends within the deadline by which another worker would send it again)
    assert state == "retrying"
    (attempt,) = one.record()["attempts"]
    assert attempt["status_code"] is None and attempt["error"] == "timed out after 1 s", attempt
    assert attempt["duration_ms"] < 0.25 * len(Answer.TRICKLED) * 1000 / 2, attempt


# --- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, public",
    [
        ("93.184.215.14", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.9", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.100.100.200", False),  # shared address space (another cloud's metadata)
        ("0.0.0.0", False),
        ("::1", False),
        ("fd00:ec2::254", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
        # IPv6 forms of a public IPv4 address stay public (an IPv6-only host reaches IPv4
        # sites through NAT64)
        ("::ffff:93.184.215.14", True),
        ("64:ff9b::5db8:d70e", True),
        ("2002:5db8:d70e::1", True),
    ],
)
def test_only_public_addresses_are_public(address: str, public: bool) -> None:
    assert addresses.public_address(address) is public


#: IPv6 addresses that lead to an IPv4 address the guard refuses, each in another form.
IPV6_FORMS_OF_REFUSED_IPV4 = {
    "mapped": "::ffff:7f00:1",
    "compatible": "::7f00:1",
    "translated": "::ffff:0:7f00:1",
    "nat64": "64:ff9b::7f00:1",
    "nat64-metadata": "64:ff9b::a9fe:a9fe",
    "nat64-local-use": "64:ff9b:1:7f00:1::",
    "6to4": "2002:7f00:1::",
    "6to4-private": "2002:a00:7::1",
    "teredo": "2001:0:4136:e378:8000:63bf:80ff:fffe",  # client 127.0.0.1, stored inverted
    "isatap": "2606:4700::5efe:a9fe:a9fe",
}


@pytest.mark.parametrize("address", IPV6_FORMS_OF_REFUSED_IPV4.values(), ids=IPV6_FORMS_OF_REFUSED_IPV4.keys())
def test_a_webhook_on_an_ipv6_form_of_a_refused_ipv4_address_is_refused_at_creation(own: Settings, address: str) -> None:
    # Given an API that does not allow private addresses
    with TestClient(create_app(own.model_copy(update={"webhook_allow_private": False})), headers=AUTH) as api:
        # When a job names a webhook on that address
        response = api.post("/v1/jobs", json={"engine": "echo", "input": {}, "webhook": f"http://[{address}]:8080/h"})

    # Then it is refused, naming the field and the address
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    assert error["field"] == "webhook" and "loopback, private" in error["message"], error


@pytest.mark.parametrize("address", IPV6_FORMS_OF_REFUSED_IPV4.values(), ids=IPV6_FORMS_OF_REFUSED_IPV4.keys())
def test_delivery_refuses_an_ipv6_form_of_a_refused_ipv4_address(one_delivery: Callable[..., OneDelivery], address: str) -> None:
    # Given a job whose webhook names such an address (stored before the guard knew better)
    one = one_delivery(url=f"http://[{address}]:8080/h", webhook_allow_private=False)

    # When a webhook worker that does not allow private addresses sends its event
    one.deliver()

    # Then no connection was tried: the attempt says the address was refused
    (attempt,) = one.record()["attempts"]
    assert attempt["status_code"] is None and "refused" in attempt["error"] and address in attempt["error"], attempt


def test_a_private_webhook_is_refused_at_creation_unless_allowed(own: Settings) -> None:
    # Given an API that does not allow private addresses
    with TestClient(create_app(own.model_copy(update={"webhook_allow_private": False})), headers=AUTH) as api:
        # When jobs name webhooks on loopback, private, link-local and metadata addresses
        for url in (
            "http://127.0.0.1:9/h",
            "http://localhost:8080/h",
            "http://10.0.0.7/h",
            "http://169.254.169.254/latest",
            "http://[::1]/h",
        ):
            response = api.post("/v1/jobs", json={"engine": "echo", "input": {}, "webhook": url})
            # Then each is refused, naming the field
            assert response.status_code == 422, (url, response.text)
            assert response.json()["errors"][0]["field"] == "webhook"
        # and a public address (no DNS needed) and a bad scheme are told apart
        accepted = api.post("/v1/jobs", json={"engine": "echo", "input": {}, "webhook": "https://93.184.215.14/hook"})
        assert accepted.status_code == 202 and accepted.json()["webhook"] == "https://93.184.215.14/hook"
        assert api.post("/v1/jobs", json={"engine": "echo", "input": {}, "webhook": "ftp://93.184.215.14/"}).status_code == 422

    # When the same API allows private addresses, Then loopback is accepted
    with TestClient(create_app(own.model_copy(update={"webhook_allow_private": True})), headers=AUTH) as api:
        response = api.post("/v1/jobs", json={"engine": "echo", "input": {}, "webhook": "http://127.0.0.1:9/h"})
        assert response.status_code == 202


def test_delivery_refuses_a_private_address_even_if_the_job_names_one(
    one_delivery: Callable[..., OneDelivery], receiver: Receiver
) -> None:
    # Given a job whose webhook points at loopback (as if DNS had changed since creation)
    one = one_delivery(webhook_allow_private=False)

    # When a webhook worker (not allowing private addresses) delivers its event
    state = one.deliver()

    # Then nothing reached the receiver, and the attempt says why
    assert state == "retrying"
    (attempt,) = one.record()["attempts"]
    assert attempt["status_code"] is None and "refused" in attempt["error"] and "127.0.0.1" in attempt["error"]
    assert receiver.received(one.hook) == []


def test_the_secret_goes_only_to_a_caller_with_a_key(own: Settings) -> None:
    with TestClient(create_app(own)) as api:
        # Without a key, or with an unknown one, nobody gets it
        assert api.get("/v1/webhooks/secret").status_code == 401
        assert api.get("/v1/webhooks/secret", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # The admin token's tenant (the default one) gets its secret, generated once, kept in Redis
        first = api.get("/v1/webhooks/secret", headers=AUTH)
        assert first.status_code == 200 and first.json()["secret"].startswith("whsec_")
        assert first.json()["previous"] is None
        again = api.get("/v1/webhooks/secret", headers=AUTH)
        assert again.json() == first.json()


# --- the event step -----------------------------------------------------------------------


def test_a_status_change_queues_the_deliveries_its_webhook_asks_for(own: Settings) -> None:
    # Given a job whose webhook wants only completion
    client = redis.Redis.from_url(REDIS_URL)
    store = JobStore(client, own)
    job_id = create_job(store, webhook="http://127.0.0.1:9/h", webhook_events="completed")

    # When it starts and ends
    store.transition(job_id, allowed=(JobStatus.queued,), to=JobStatus.running)
    store.transition(job_id, allowed=(JobStatus.running,), to=JobStatus.succeeded, output='{"n":1}')

    # Then both changes are events of its stream, expiring with the job
    events = stream_entries(client, stream_key(own.redis_prefix, job_id))
    assert [e[1][b"type"] for e in events] == [b"job.started", b"job.completed"]
    assert json.loads(events[1][1][b"job"])["status"] == "succeeded"
    assert 0 < client.pttl(stream_key(own.redis_prefix, job_id)) <= own.job_ttl_s * 1000
    # and only the completion became a delivery, whose Celery message a worker decodes
    delivery = only_delivery(client, own, job_id)
    assert (delivery["type"], delivery["state"]) == ("job.completed", "pending")
    (raw,) = client.lrange(own.key("webhooks"), 0, -1)
    with Connection(REDIS_URL) as connection:
        message = connection.default_channel.Message(json.loads(raw), channel=connection.default_channel)
        args, kwargs, _ = message.decode()
    assert message.headers["task"] == DELIVER_TASK == tasks.deliver_webhook.name and DELIVER_TASK in celery_app.tasks
    assert (args, kwargs) == ([job_id, delivery["id"]], {})
    client.close()


def test_progress_is_throttled_and_lands_only_while_the_job_runs(own: Settings) -> None:
    # Given a running job whose webhook wants progress, and a reporter sending every 0.2 s
    client = redis.Redis.from_url(REDIS_URL)
    store = JobStore(client, own)
    job_id = create_job(store, webhook="http://127.0.0.1:9/h", webhook_events="progress")
    assert append_event(client, prefix=own.redis_prefix, job_id=job_id, kind="job.progress", fields={"progress": "{}"}) is None
    store.transition(job_id, allowed=(JobStatus.queued,), to=JobStatus.running)
    reporter = ProgressReporter(client, prefix=own.redis_prefix, interval_s=0.2)

    # When a pipeline reports 50 steps within about half a second
    for step in range(1, 51):
        reporter.report(job_id, step, 50)
        time.sleep(0.01)
    reporter.flush()
    reporter.close()

    # Then a handful of events went out, the latest step last, each a delivery
    events = [e for e in stream_entries(client, stream_key(own.redis_prefix, job_id)) if e[1][b"type"] == b"job.progress"]
    steps = [json.loads(e[1][b"progress"])["step"] for e in events]
    assert 2 <= len(steps) <= 5 and steps == sorted(steps) and steps[-1] == 50, steps
    assert json.loads(store.get(job_id)["progress"]) == {"step": 50, "total": 50}
    assert len(delivery_list(client.hgetall(deliveries_key(own.redis_prefix, job_id)))) == len(steps)
    # and once the job has ended, a late report changes nothing
    store.transition(job_id, allowed=(JobStatus.running,), to=JobStatus.canceled)
    assert append_event(client, prefix=own.redis_prefix, job_id=job_id, kind="job.progress", fields={"progress": "{}"}) is None
    types = [e[1][b"type"] for e in stream_entries(client, stream_key(own.redis_prefix, job_id))]
    assert types == [b"job.started", *[b"job.progress"] * len(steps), b"job.completed"]
    client.close()
