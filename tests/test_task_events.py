"""The task events Flower reads leave a worker in batches: a short job's received, started and
succeeded are one Redis PUBLISH, not three (``blaze_jobs.task_events``)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import redis

from blaze_jobs.client import BlazeClient
from blaze_jobs.settings import Settings

pytestmark = pytest.mark.timeout(240)


def task_events(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The events in one message of Celery's event exchange (kombu's envelope, a list or one)."""
    envelope = json.loads(message["data"])
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    events = json.loads(body)
    return events if isinstance(events, list) else [events]


def test_a_short_jobs_task_events_leave_its_worker_in_one_publish(
    stack: dict[str, Any], client: BlazeClient, settings: Settings
) -> None:
    with redis.Redis.from_url(settings.redis_url) as connection, connection.pubsub() as subscriber:
        # Given a subscriber to the workers' task events, as Flower is
        subscriber.psubscribe(f"{settings.redis_prefix}*celeryev/task.*")
        assert subscriber.get_message(timeout=5)["type"] == "psubscribe"
        # and workers quiet: no earlier job's events still on their way
        while subscriber.get_message(timeout=1.0) is not None:
            pass

        # When an echo job runs to its end
        job = client.wait(client.submit("echo", {"sleep_ms": 0})["id"], timeout=60)
        assert job["status"] == "succeeded"

        # Then its three events come, all in one message
        carrying: list[list[str]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(len(kinds) for kinds in carrying) < 3:
            message = subscriber.get_message(timeout=0.5)
            if message is None or message["type"] != "pmessage":
                continue
            kinds = [event["type"] for event in task_events(message) if event.get("uuid") == job["id"]]
            if kinds:
                carrying.append(kinds)
        assert carrying == [["task-received", "task-started", "task-succeeded"]]
