"""Listing jobs with the echo worker: pages newest first by cursor, filters by status and
engine, and every job carries the whole contract."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import pytest

from blaze_jobs.client import BlazeClient
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(240)

ENDED = ("succeeded", "failed", "canceled")


def wait_ended(client: BlazeClient, job_id: str, *, timeout: float = 20) -> dict[str, Any]:
    return wait_until(
        lambda: (job := client.get(job_id))["status"] in ENDED and job, timeout=timeout, what=f"job {job_id} to end"
    )


def all_pages(http: httpx.Client, **params: Any) -> list[list[dict[str, Any]]]:
    """Every page of ``GET /v1/jobs`` with ``params``, following ``next_cursor`` to the end."""
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        response = http.get("/v1/jobs", params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page["jobs"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 1_000, "the cursor never ends"


def test_pages_of_echo_jobs_come_newest_first_without_gaps_or_repeats(client: BlazeClient, http: httpx.Client) -> None:
    # Given seven echo jobs, submitted one after another, all succeeded
    submitted = [client.submit("echo", {"n": i})["id"] for i in range(7)]
    for job_id in submitted:
        assert wait_ended(client, job_id)["status"] == "succeeded"

    # When a client pages through the echo jobs three at a time
    pages = all_pages(http, engine="echo", limit=3)

    # Then each page but the last is full, and the last one says there is no next
    assert all(len(page) == 3 for page in pages[:-1])
    assert 1 <= len(pages[-1]) <= 3
    listed = [job for page in pages for job in page]
    ids = [job["id"] for job in listed]
    # And no job appears twice, every one of the seven appears, and only echo jobs do
    assert len(ids) == len(set(ids))
    assert set(submitted) <= set(ids)
    assert {job["engine"] for job in listed} == {"echo"}
    # And the order is newest first: the seven in reverse submission order, every job's
    # creation no later than the one before it
    assert [i for i in ids if i in submitted] == submitted[::-1]
    created = [datetime.fromisoformat(job["created_at"]) for job in listed]
    assert created == sorted(created, reverse=True)


def test_the_status_filter_lists_only_that_status(client: BlazeClient, http: httpx.Client) -> None:
    # Given a succeeded echo job
    done = client.submit("echo", {"filter": "succeeded"})["id"]
    assert wait_ended(client, done)["status"] == "succeeded"

    # When a client lists succeeded jobs (every page)
    listed = [job for page in all_pages(http, status="succeeded", limit=50) for job in page]

    # Then they are all succeeded, the new one among them
    assert {job["status"] for job in listed} == {"succeeded"}
    assert done in [job["id"] for job in listed]
    # And it is not listed under another status
    for other in ("queued", "running", "failed", "canceled"):
        assert done not in [job["id"] for page in all_pages(http, status=other, limit=200) for job in page]


def test_canceled_jobs_move_to_the_canceled_listing(client: BlazeClient, http: httpx.Client) -> None:
    # Given the echo worker busy with a long job, and a second job queued behind it
    running = client.submit("echo", {"sleep_ms": 10_000})["id"]
    wait_until(lambda: client.get(running)["status"] == "running", timeout=20, what=f"job {running} to start")
    queued = client.submit("echo", {"behind": running})["id"]
    assert client.get(queued)["status"] == "queued"
    queued_ids = [job["id"] for page in all_pages(http, status="queued", limit=200) for job in page]
    assert queued in queued_ids

    # When both are canceled
    assert client.cancel(queued)["status"] == "canceled"
    assert client.cancel(running)["status"] == "canceled"

    # Then both are listed as canceled and neither as queued or running
    canceled = [job for page in all_pages(http, status="canceled", limit=200) for job in page]
    assert {running, queued} <= {job["id"] for job in canceled}
    assert {job["status"] for job in canceled} == {"canceled"}
    for other in ("queued", "running"):
        assert not {running, queued} & {job["id"] for page in all_pages(http, status=other, limit=200) for job in page}
    # And the worker, once free, drops the queued one: a job submitted after it runs (the
    # queue is first in, first out), and the canceled one never started
    after = client.submit("echo", {"after": queued})["id"]
    assert wait_ended(client, after)["status"] == "succeeded"
    job = client.get(queued)
    assert job["status"] == "canceled" and job["started_at"] is None and job["attempts"] == 0
    assert job["error"]["type"] == "canceled"


def test_a_job_carries_every_field_of_the_contract(client: BlazeClient, http: httpx.Client) -> None:
    # When a client submits an echo job
    response = http.post("/v1/jobs", json={"engine": "echo", "input": {"hello": "world"}})

    # Then it is accepted, with the job's URL in Location, and the whole record
    assert response.status_code == 202
    accepted = response.json()
    assert response.headers["location"] == accepted["urls"]["get"]
    assert accepted["urls"]["get"].endswith(f"/v1/jobs/{accepted['id']}")
    assert accepted["urls"]["cancel"] == accepted["urls"]["get"] + "/cancel"
    assert accepted["status"] == "queued"
    assert accepted["engine"] == "echo" and accepted["model"] == "builtin:echo"
    assert accepted["input"] == {"hello": "world", "sleep_ms": 0}
    assert accepted["output"] is None and accepted["error"] is None
    assert accepted["started_at"] is None and accepted["completed_at"] is None
    assert accepted["attempts"] == 0

    # When it has run
    job = wait_ended(client, accepted["id"])

    # Then every field of the contract is there, filled in
    fields = {
        "id",
        "engine",
        "model",
        "status",
        "input",
        "output",
        "error",
        "created_at",
        "started_at",
        "completed_at",
        "attempts",
        "metrics",
        "urls",
    }
    assert fields <= job.keys()
    assert set(job["metrics"]) >= {"queue_time_s", "run_time_s", "batch_size"}
    assert set(job["urls"]) >= {"get", "cancel"}
    assert job["status"] == "succeeded"
    assert job["output"] == {"hello": "world", "sleep_ms": 0}
    assert job["error"] is None
    assert job["attempts"] == 1
    created, started, completed = (datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "completed_at"))
    assert created <= started <= completed
    assert created.tzinfo is not None
    assert job["metrics"]["queue_time_s"] >= 0 and job["metrics"]["run_time_s"] >= 0
    assert job["metrics"]["batch_size"] == 1
    assert job["urls"] == accepted["urls"]
    # And the listing shows the same record as GET
    (listed,) = [j for j in http.get("/v1/jobs", params={"engine": "echo", "limit": 5}).json()["jobs"] if j["id"] == job["id"]]
    assert listed == job
