"""Webhooks against the running stack: events arrive in order and signed, failing receivers
get the event again with the same id, 410 stops deliveries, a silent receiver delays no
job, and cancels and cache hits send their completion."""

from __future__ import annotations

import random
import time
from datetime import datetime
from typing import Any

import pytest

from blaze_jobs.client import BlazeClient
from tests.conftest import wait_until
from tests.receiver import Answer, Receiver, path, verified, without_urls

# Generous: the first test to use the stack also waits for it to start.
pytestmark = pytest.mark.timeout(300)


def test_events_arrive_in_order_signed_with_stable_ids(client: BlazeClient, receiver: Receiver, secret: str) -> None:
    # Given an image job whose webhook wants every event, progress included
    hook = path()
    job = client.submit(
        "diffusion",
        {"prompt": "a lighthouse", "num_inference_steps": 30, "seed": random.randrange(2**31)},
        webhook=receiver.url(hook),
        webhook_events_filter=["started", "progress", "completed"],
    )

    # When it runs to the end
    final = client.wait(job["id"], timeout=150)  # generous: 30 steps on a busy 2-core machine
    assert final["status"] == "succeeded"
    deliveries = wait_until(
        lambda: (d := client.deliveries(job["id"])) and all(x["state"] == "succeeded" for x in d) and d,
        timeout=10,
        what="every delivery to succeed",
    )

    # Then every request verifies, and the events came in order: started, progress, completed
    requests = receiver.wait_for(hook, len(deliveries), timeout=5)
    events = [verified(secret, r) for r in requests]
    types = [e["type"] for e in events]
    assert types[0] == "job.started" and types[-1] == "job.completed"
    assert set(types[1:-1]) == {"job.progress"} and len(types) >= 3
    steps = [e["data"]["progress"]["step"] for e in events[1:-1]]
    assert steps == sorted(steps) and all(e["data"]["progress"]["total"] == 30 for e in events[1:-1])
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    # each event has its own id, the one the deliveries show
    ids = [r.headers["webhook-id"] for r in requests]
    assert len(set(ids)) == len(ids) and ids == [d["webhook_id"] for d in deliveries]
    # and the last carries the whole final job: no further call needed
    completed = events[-1]["data"]
    assert final["progress"] == {"step": 30, "total": 30}
    # (URLs in a webhook name the API by BLAZE_PUBLIC_URL or BLAZE_API_URL, which the
    # test stack leaves at its default.)
    assert without_urls(completed) == without_urls(final)
    assert completed["output"]["images"][0]["url"].endswith(final["output"]["images"][0]["url"].split("/v1/")[1])


def test_a_failing_receiver_gets_the_event_later_with_the_same_id(client: BlazeClient, receiver: Receiver, secret: str) -> None:
    # Given a receiver that fails twice, the second time asking for a second's pause
    hook = path()
    receiver.answer(hook, Answer(500), Answer(503, {"Retry-After": "1"}))
    job = client.submit("echo", {"n": 1}, webhook=receiver.url(hook), webhook_events_filter=["completed"])

    # When the job completes
    requests = receiver.wait_for(hook, 3, timeout=15)

    # Then the same event came three times, with one webhook-id, each signed afresh
    assert {r.headers["webhook-id"] for r in requests} == {requests[0].headers["webhook-id"]}
    assert [verified(secret, r)["type"] for r in requests] == ["job.completed"] * 3
    assert len({r.body for r in requests}) == 1
    # after the schedule's 0.2 s (± jitter), then after the 1 s Retry-After asked for (lower
    # bounds only: a busy machine may send late, never early)
    assert requests[1].at - requests[0].at > 0.1
    assert requests[2].at - requests[1].at >= 0.95
    # and every attempt is on record
    (delivery,) = wait_until(
        lambda: [d for d in client.deliveries(job["id"]) if d["state"] == "succeeded"], timeout=5, what="the delivery to succeed"
    )
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 503, 200]
    assert [a["error"] for a in delivery["attempts"]] == ["HTTP 500", "HTTP 503", None]
    assert all(a["duration_ms"] > 0 for a in delivery["attempts"])

    # When the delivery is asked for again
    again = client.redeliver(job["id"], delivery["id"])

    # Then the receiver gets the same event, same id, same body once more
    assert again["redelivery_of"] == delivery["id"] and again["webhook_id"] == delivery["webhook_id"]
    fourth = receiver.wait_for(hook, 4, timeout=10)[3]
    assert fourth.headers["webhook-id"] == delivery["webhook_id"] and fourth.body == requests[0].body
    verified(secret, fourth)


def test_410_gone_stops_deliveries_for_the_job(client: BlazeClient, receiver: Receiver) -> None:
    # Given a receiver that answers 410 Gone
    hook = path()
    receiver.answer(hook, *[Answer(410)] * 5)
    job = client.submit("echo", {"sleep_ms": 300}, webhook=receiver.url(hook))

    # When the job starts (410) and then completes
    client.wait(job["id"], timeout=30)
    wait_until(lambda: client.deliveries(job["id"])[0]["state"] == "gone", timeout=10, what="the 410 to be recorded")
    time.sleep(0.5)

    # Then the receiver heard once: the completion was neither sent nor queued, nothing retried
    assert len(receiver.received(hook)) == 1
    deliveries = client.deliveries(job["id"])
    assert [(d["type"], d["state"], len(d["attempts"])) for d in deliveries] == [("job.started", "gone", 1)]


def test_a_receiver_that_never_answers_does_not_delay_the_next_job(client: BlazeClient, receiver: Receiver) -> None:
    # Given a receiver that holds every request past the delivery timeout (2 s in tests)
    hook = path()
    receiver.answer(hook, *[Answer(200, delay_s=5)] * 8)

    # When echo jobs with that webhook run, one after another on the one echo task thread
    slow = [client.submit("echo", {"n": n}, webhook=receiver.url(hook)) for n in range(3)]
    ended = [client.wait(job["id"], timeout=60) for job in slow]
    assert [job["status"] for job in ended] == ["succeeded"] * 3

    # Then each job started before its predecessor's completion had been given up on: the
    # worker never waited for the receiver (however slow this machine is)
    def first_attempts() -> list[dict[str, Any]] | None:
        found = [
            next((a for d in client.deliveries(job["id"]) if d["type"] == "job.completed" for a in d["attempts"]), None)
            for job in slow
        ]
        attempts = [a for a in found if a is not None]
        return attempts if len(attempts) == len(slow) else None

    attempts = wait_until(first_attempts, timeout=30, what="every completion's first attempt")
    # the last job has no successor
    for attempt, successor in zip(attempts, ended[1:], strict=False):
        gave_up = datetime.fromisoformat(attempt["at"]).timestamp() + attempt["duration_ms"] / 1000
        assert datetime.fromisoformat(successor["started_at"]).timestamp() < gave_up, (attempt, successor)
    # and the deliveries record the timeouts, to be retried
    assert all(a["status_code"] is None and "timed out" in a["error"] for a in attempts), attempts


def test_canceling_a_job_sends_its_completion(client: BlazeClient, receiver: Receiver, secret: str) -> None:
    hook = path()
    job = client.submit("echo", {"sleep_ms": 10_000}, webhook=receiver.url(hook))
    wait_until(lambda: client.get(job["id"])["status"] == "running", timeout=10, what="the job to start")
    client.cancel(job["id"])
    started, completed = (verified(secret, r) for r in receiver.wait_for(hook, 2, timeout=10))
    assert (started["type"], completed["type"]) == ("job.started", "job.completed")
    assert completed["data"]["status"] == "canceled" and completed["data"]["error"]["type"] == "canceled"


def test_a_job_born_from_the_cache_sends_its_completion(client: BlazeClient, receiver: Receiver, secret: str) -> None:
    # Given a deterministic echo job computed once
    data = {"seed": random.randrange(2**31), "word": "again"}
    client.wait(client.submit("echo", data)["id"], timeout=30)

    # When the same request comes with a webhook, answered from the cache at creation
    hook = path()
    job = client.submit("echo", data, webhook=receiver.url(hook))
    assert job["status"] == "succeeded" and job["metrics"]["cache_hit"]

    # Then its webhook still hears of the completion
    (request,) = receiver.wait_for(hook, 1, timeout=10)
    event = verified(secret, request)
    assert event["type"] == "job.completed" and event["data"]["id"] == job["id"] and event["data"]["output"] == job["output"]


def test_a_webhook_worker_runs_without_torch(test_env: dict[str, str]) -> None:
    import subprocess
    import sys

    code = "import sys, blaze_jobs.workers.webhooks, blaze_jobs.tasks; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=test_env, timeout=60).returncode == 0
