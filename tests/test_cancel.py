"""Canceling jobs: a queued job never runs, a running one stops at its next step."""

from __future__ import annotations

import time
from datetime import datetime

import httpx
import pytest

from blaze_jobs.client import BlazeClient
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(180)


def status_of(client: BlazeClient, job_id: str) -> str:
    return client.get(job_id)["status"]


def test_a_queued_job_is_canceled_and_never_runs(client: BlazeClient) -> None:
    # Given the one echo worker busy with a long job, and a second job queued behind it
    busy = client.submit("echo", {"sleep_ms": 2000})
    wait_until(lambda: status_of(client, busy["id"]) == "running", timeout=30, what="the first job to start")
    queued = client.submit("echo", {"marker": "never"})

    # When the queued job is canceled
    canceled = client.cancel(queued["id"])

    # Then it is canceled at once, and after the worker is free it still never ran
    assert canceled["status"] == "canceled" and canceled["completed_at"]
    assert client.wait(busy["id"], timeout=30)["status"] == "succeeded"
    after = client.wait(client.submit("echo", {})["id"], timeout=30)
    assert after["status"] == "succeeded"
    job = client.get(queued["id"])
    assert (job["status"], job["started_at"], job["attempts"], job["output"]) == ("canceled", None, 0, None)


def test_a_running_echo_job_stops_when_canceled(client: BlazeClient) -> None:
    # Given an echo job that would run for a minute
    job = client.submit("echo", {"sleep_ms": 60_000})
    wait_until(lambda: status_of(client, job["id"]) == "running", timeout=30, what="the job to start")

    # When it is canceled
    assert client.cancel(job["id"])["status"] == "canceled"

    # Then the worker (one task thread) is free for the next job long before the canceled
    # one's minute is up, and the job stays canceled
    nxt = client.wait(client.submit("echo", {})["id"], timeout=40)
    assert nxt["status"] == "succeeded"
    assert client.get(job["id"])["status"] == "canceled"


def test_a_running_image_job_stops_at_its_next_step(client: BlazeClient) -> None:
    # Given an image job that takes many seconds (150 steps at 128x128 on a CPU)
    long = client.submit("diffusion", {"prompt": "a long night", "width": 128, "height": 128, "num_inference_steps": 150})
    running = wait_until(
        lambda: (job := client.get(long["id"]))["progress"] and job["progress"]["step"] >= 5 and job,
        timeout=120,
        what="the image job to make five steps",
    )

    # When it is canceled
    canceled_at = time.time()
    assert client.cancel(long["id"])["status"] == "canceled"

    # Then the worker drops it and starts the next job sooner than a third of the time its
    # 150 steps take at the pace it ran so far (progress reports lag, so that pace is a bit
    # slower than its steps'): a worker that kept running it would start the next job only
    # after all 150
    began = datetime.fromisoformat(running["started_at"]).timestamp()
    would_end = began + 150 * (canceled_at - began) / running["progress"]["step"] / 3
    nxt = client.wait(client.submit("diffusion", {"prompt": "next", "num_inference_steps": 2})["id"], timeout=120)
    assert nxt["status"] == "succeeded", nxt["error"]
    started = datetime.fromisoformat(nxt["started_at"]).timestamp()
    assert started < would_end, "the canceled job kept the worker busy"
    # and the canceled job never turns into a success
    job = client.get(long["id"])
    assert job["status"] == "canceled" and job["output"] is None


def test_canceling_an_ended_job_is_a_conflict(client: BlazeClient, http: httpx.Client) -> None:
    job = client.wait(client.submit("echo", {})["id"], timeout=30)
    response = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert "already ended" in response.json()["detail"]
    assert client.get(job["id"])["status"] == "succeeded"
