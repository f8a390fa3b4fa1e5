"""The Python clients as a user holds them: submit, wait (long-poll), follow events, cancel,
download, and verify the webhooks a receiver gets."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import Any

import pytest

from blaze_jobs.client import AsyncBlazeClient, BlazeClient, SSEParser
from blaze_jobs.signing import WebhookVerificationError, new_secret
from tests.conftest import ADMIN_TOKEN
from tests.receiver import Receiver

# Generous: the first test to use the stack also waits for it to start.
pytestmark = pytest.mark.timeout(180)


def test_the_client_follows_a_job_from_submit_to_image(stack: dict[str, Any]) -> None:
    with BlazeClient(stack["api_url"]) as client:
        # Given an image job
        job = client.submit("diffusion", {"prompt": "a fox", "num_inference_steps": 8, "seed": 11})

        # When the client follows its events to the end
        events = list(client.events(job["id"]))

        # Then it saw the job start and end, and the image it downloads is the one reported
        assert events[0].event == "job"
        assert "job.started" in [e.event for e in events] or events[0].data["status"] != "queued"
        final = events[-1]
        assert final.final and final.data["status"] == "succeeded"
        image = final.data["output"]["images"][0]
        data = client.download(image["url"])
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and hashlib.sha256(data).hexdigest() == image["sha256"]
        # and waiting on an ended job answers at once
        assert client.wait(job["id"], timeout=5) == final.data


def test_wait_long_polls_and_submit_can_wait(stack: dict[str, Any]) -> None:
    with BlazeClient(stack["api_url"]) as client:
        job = client.submit("echo", {"sleep_ms": 600})
        started = time.monotonic()
        ended = client.wait(job["id"], timeout=30)
        assert ended["status"] == "succeeded" and 0.5 < time.monotonic() - started < 1.5
        assert client.submit("echo", {"sleep_ms": 100}, wait=5)["status"] == "succeeded"
        with pytest.raises(TimeoutError):
            client.wait(client.submit("echo", {"sleep_ms": 5000})["id"], timeout=0.3)


def test_the_async_client_does_the_same(stack: dict[str, Any]) -> None:
    async def story() -> None:
        async with AsyncBlazeClient(stack["api_url"], admin_token=ADMIN_TOKEN) as client:
            # Two jobs followed at once: one by its events, one by long-poll
            first = await client.submit("echo", {"sleep_ms": 300, "tag": "a"})
            second = await client.submit("echo", {"sleep_ms": 300, "tag": "b"})

            async def follow(job_id: str) -> list[Any]:
                return [event async for event in client.events(job_id)]

            events, waited = await asyncio.gather(follow(first["id"]), client.wait(second["id"], timeout=30))
            assert events[-1].final and events[-1].data["output"]["tag"] == "a"
            assert waited["status"] == "succeeded" and waited["output"]["tag"] == "b"
            assert (await client.get(first["id"], wait=1)) == events[-1].data

            # and a running job is canceled
            long = await client.submit("echo", {"sleep_ms": 10_000})
            assert (await client.cancel(long["id"]))["status"] == "canceled"
            assert (await client.wait(long["id"], timeout=5))["status"] == "canceled"
            assert (await client.webhook_secret()).startswith("whsec_")

    asyncio.run(story())


def test_a_receiver_verifies_webhooks_with_the_client(stack: dict[str, Any]) -> None:
    receiver = Receiver()
    hook = f"/hook/{uuid.uuid4().hex[:8]}"
    try:
        with BlazeClient(stack["api_url"], admin_token=ADMIN_TOKEN) as client:
            # Given a job whose webhook reaches a receiver
            job = client.submit("echo", {"n": 1}, webhook=receiver.url(hook), webhook_events_filter=["completed"])
            (request,) = receiver.wait_for(hook, 1, timeout=10)

            # When the receiver verifies it, Then it gets the event
            event = client.verify_webhook(request.headers, request.body)
            assert event["type"] == "job.completed" and event["data"]["id"] == job["id"]
            # but a changed body, or another deployment's secret, fails
            with pytest.raises(WebhookVerificationError):
                client.verify_webhook(request.headers, request.body.replace(b'"n":1', b'"n":2'))
            with BlazeClient(stack["api_url"], webhook_secret=new_secret()) as stranger:
                with pytest.raises(WebhookVerificationError):
                    stranger.verify_webhook(request.headers, request.body)
    finally:
        receiver.close()


def test_the_event_parser_follows_the_sse_rules() -> None:
    parser = SSEParser()
    lines = ["retry: 1000", "", ": keep-alive", "", "id: 5-0", "event: job.progress", 'data: {"step": 1,', 'data: "total": 2}', ""]
    events = [e for e in (parser.feed(line) for line in lines) if e]
    assert [(e.id, e.event, e.data) for e in events] == [("5-0", "job.progress", {"step": 1, "total": 2})]
