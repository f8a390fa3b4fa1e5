"""Many clients waiting at once: long-polls and event streams open on queued jobs while a
burst of creates arrives, over real HTTP to a real ``blaze api``. Nothing is refused, and
every waiter gets its job's end as soon as an echo worker runs it.

A waiter costs the API no Redis connection of its own (one reader per process serves them
all), so the count of waiters is bounded by sockets, not by a connection pool."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from blaze_jobs.stack import Stack
from tests.chaos.harness import Row, admin_headers, redis_and_api, tally, wait_all_ended

pytestmark = pytest.mark.timeout(180)

#: Jobs the waiters wait on: several waiters share each job, as clients of one job do.
WAITED_JOBS = 50


async def long_poll(http: httpx.AsyncClient, job_id: str) -> dict[str, Any] | str:
    """``GET /v1/jobs/{id}?wait=60``: the job as answered, or what went wrong."""
    try:
        response = await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}"
    return response.json() if response.status_code == 200 else f"{response.status_code} {response.text[:200]}"


async def follow(
    http: httpx.AsyncClient, job_id: str, opened: asyncio.Event, *, count: list[int], total: int
) -> dict[str, Any] | str:
    """Follow the job's event stream to its ``job.completed``; the final job, or what went wrong."""
    try:
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            if response.status_code != 200:
                return f"{response.status_code} {(await response.aread())[:200]!r}"
            kind = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: ") :]
                elif line.startswith("data: ") and kind == "job":
                    count[0] += 1
                    if count[0] == total:
                        opened.set()
                elif line.startswith("data: ") and kind == "job.completed":
                    return json.loads(line[len("data: ") :])
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}"
    return "the stream ended without job.completed"


async def create(http: httpx.AsyncClient, n: int) -> str | None:
    """One ``POST /v1/jobs``; the job id, or None if it was refused."""
    try:
        response = await http.post("/v1/jobs", json={"engine": "echo", "input": {"n": n}})
    except httpx.HTTPError:
        return None
    return response.json()["id"] if response.status_code == 202 else None


async def crowd(api_url: str, stack: Stack, *, headers: dict[str, str], waiters: int, creates: int) -> dict[str, Any]:
    """Open ``waiters`` long-polls and event streams (half each) on queued jobs, then send
    ``creates`` creates at once, then start a worker; what every client got."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(90, connect=30)
    async with httpx.AsyncClient(base_url=api_url, limits=limits, timeout=timeout, headers=headers) as http:
        # Given jobs that nothing runs yet (no worker), with many clients waiting on them
        answers = await asyncio.gather(*(create(http, n) for n in range(WAITED_JOBS)))
        waited = [job_id for job_id in answers if job_id is not None]
        assert len(waited) == WAITED_JOBS, "the jobs to wait on were not all accepted"
        streams, opened, count = waiters // 2, asyncio.Event(), [0]
        polls = [asyncio.create_task(long_poll(http, waited[i % WAITED_JOBS])) for i in range(waiters - streams)]
        follows = [
            asyncio.create_task(follow(http, waited[i % WAITED_JOBS], opened, count=count, total=streams)) for i in range(streams)
        ]
        started = time.monotonic()
        await asyncio.wait_for(opened.wait(), timeout=60)
        times = {"streams_open_s": time.monotonic() - started}

        # When a burst of creates arrives while they all wait
        started = time.monotonic()
        created = await asyncio.gather(*(create(http, WAITED_JOBS + n) for n in range(creates)))
        times["creates_s"] = time.monotonic() - started
        still_waiting = sum(not t.done() for t in polls + follows)

        # and then a worker runs the jobs
        stack.blaze("worker", "worker", "--engine", "echo", "--concurrency", "4")
        polled = await asyncio.gather(*polls)
        followed = await asyncio.gather(*follows)
        times["worker_start_to_last_end_s"] = time.monotonic() - started - times["creates_s"]
    return {
        "waited": waited,
        "created": created,
        "polled": polled,
        "followed": followed,
        "still_waiting": still_waiting,
        "times": {k: round(v, 2) for k, v in times.items()},
    }


def scenario_many_waiters(*, env: dict[str, str], tmp_path: Path, scale: int) -> Row:
    """``600 × scale`` waiters (half long-polls, half event streams) open on queued jobs,
    ``300`` creates at once, then a worker: nothing refused, every waiter gets the end."""
    waiters, creates = 600 * scale, 300
    prefix = "blaze-chaos-waiters:"
    row = Row("many_waiters", notes={"waiters": waiters, "creates": creates})
    # Every waiter is a socket here and in the API (the API raises its own soft limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 2 * (waiters + creates) + 1024)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    with Stack(env=env, log_dir=tmp_path) as stack:
        server, api_url = redis_and_api(stack, tmp_path, prefix=prefix)
        started = time.monotonic()
        seen = asyncio.run(crowd(api_url, stack, headers=admin_headers(env), waiters=waiters, creates=creates))
        created = [job_id for job_id in seen["created"] if job_id]
        records = wait_all_ended(server.url, prefix, seen["waited"] + created, timeout=60)
        tally(row, records)
        row.recovery_s = round(time.monotonic() - started, 1)
        refused = [answer for answer in seen["polled"] + seen["followed"] if isinstance(answer, str)]
        row.notes["creates_refused"] = creates - len(created)
        row.notes["waiters_failed"] = len(refused)
        row.notes["waiters_without_the_end"] = sum(
            not isinstance(a, dict) or a.get("status") != "succeeded" for a in seen["polled"] + seen["followed"]
        )
        row.notes["waiters_open_during_the_creates"] = seen["still_waiting"]
        row.notes["first_failures"] = sorted(set(refused))[:3]
        row.notes.update(seen["times"])
    return row


def test_many_waiters_and_a_burst_of_creates_get_no_error(test_env: dict[str, str], tmp_path: Path) -> None:
    row = scenario_many_waiters(env=test_env, tmp_path=tmp_path, scale=1)
    assert row.notes["creates_refused"] == 0, row
    assert row.notes["waiters_open_during_the_creates"] == row.notes["waiters"], row
    assert (row.notes["waiters_failed"], row.notes["waiters_without_the_end"]) == (0, 0), row
    assert (row.lost, row.run_twice, row.wrongly_failed) == (0, 0, 0), row
