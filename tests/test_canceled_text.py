"""A canceled text job ends with the text it streamed: its final ``job.completed`` event,
its record and ``GET`` all carry the same output, the pieces a client was sent before the
cancel, whatever the worker generated after it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

from blaze_jobs.client import SSEParser
from blaze_jobs.events import TextStream, stream_key
from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from blaze_jobs.store import AsyncJobStore, JobStore, Keys
from tests.conftest import AUTH, REDIS_URL, own_prefix, start_api, wait_for_workers, wait_until

pytestmark = pytest.mark.timeout(240)

#: Pieces of text a client reads before it cancels: enough that the job is well under way.
PIECES_BEFORE_CANCEL = 8


def test_a_canceled_text_job_ends_with_the_text_it_streamed(own_stack: Stack) -> None:
    # Given a text worker and a long greedy job (its text runs to max_new_tokens: no end of sequence)
    api_url = start_api(own_stack)
    own_stack.blaze("worker-llm", "worker", "--engine", "llm", OMP_NUM_THREADS="1")
    wait_for_workers(api_url, 1)
    http = httpx.Client(base_url=api_url, timeout=30, headers=AUTH)
    request = {"prompt": "A canceled tale: the tide", "max_new_tokens": 1000, "temperature": 0}
    job = http.post("/v1/jobs", json={"engine": "llm", "input": request}).json()

    # When a client reads its stream and cancels it after some pieces of text
    pieces: list[str] = []
    completed: dict[str, Any] | None = None
    with http.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=httpx.Timeout(30, read=60)) as response:
        parser = SSEParser()
        for line in response.iter_lines():
            event = parser.feed(line)
            if event is None:
                continue
            if event.event == "job.delta":
                pieces.append(event.data["text"])
                if len(pieces) == PIECES_BEFORE_CANCEL:
                    assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
            elif event.event == "job.completed":
                completed = event.data
                break
    assert completed is not None and completed["status"] == "canceled"

    # Then its last event carries the text it streamed, every piece and nothing after them
    output = completed["output"]
    assert output is not None, "the cancel's job.completed carries no output"
    assert output["text"] == "".join(pieces) and output["finish_reason"] == "canceled"
    assert output["usage"]["prompt_tokens"] > 0
    assert len(pieces) <= output["usage"]["completion_tokens"] < 1000

    # and once the worker has let it go (its lease is gone), the record says the same
    lease = Keys(own_stack.env["BLAZE_REDIS_PREFIX"]).lease(job["id"])
    with redis.Redis.from_url(own_stack.env["BLAZE_REDIS_URL"]) as client:
        wait_until(lambda: not client.exists(lease), timeout=60, what="the worker to let the canceled job go")
    record = http.get(f"/v1/jobs/{job['id']}").json()
    assert (record["status"], record["output"]) == ("canceled", output)
    http.close()


def test_a_canceled_text_job_keeps_only_the_text_of_the_attempt_that_ran() -> None:
    # The store and the stream alone, against a real Redis under a prefix of the test's own.
    with own_prefix("canceled-text") as prefix, redis.Redis.from_url(REDIS_URL) as client:
        settings = Settings(redis_url=REDIS_URL, redis_prefix=prefix)
        store = JobStore(client, settings)

        def attempt(job_id: str, pieces: list[str]) -> None:
            """A worker takes the job and streams ``pieces``, as the engine hands them out."""
            store.take(job_id, worker="w", lease_ms=10_000)
            text = TextStream(client, prefix=prefix, job_id=job_id, settings=settings)
            for n, piece in enumerate(pieces, start=1):
                text.on_partial({"usage": {"prompt_tokens": 4, "completion_tokens": 2 * n}, "seed": 7})
                text.on_delta(piece)

        def cancel(job_id: str) -> dict[str, Any]:
            """The API's cancel; returns the job as its job.completed event carries it."""

            async def run() -> None:
                async with redis.asyncio.Redis.from_url(REDIS_URL) as api:
                    await AsyncJobStore(api, settings).cancel(job_id, tenant="default")

            asyncio.run(run())
            [(_, last)] = client.xrevrange(stream_key(prefix, job_id), count=1)
            assert last[b"type"] == b"job.completed"
            return json.loads(last[b"job"])

        # Given two text jobs whose first attempt streamed text, then was put back (its worker faulted)
        jobs = [f"job-{n}" for n in range(2)]
        for job_id in jobs:
            store.create(
                new_record(
                    job_id=job_id, tenant="default", engine="llm", model="m", input={"prompt": "p"}, created_at=time.time()
                )
            )
            attempt(job_id, ["lost ", "text"])
            store.transition(job_id, allowed=(JobStatus.running,), to=JobStatus.queued)

        # When the second attempt of one streams text of its own, and the other's none, and both are canceled
        attempt(jobs[0], ["kept", " text"])
        attempt(jobs[1], [])
        first, second = cancel(jobs[0]), cancel(jobs[1])

        # Then the first ends with its second attempt's text and usage, in its event and its record
        want = {
            "usage": {"prompt_tokens": 4, "completion_tokens": 4},
            "seed": 7,
            "text": "kept text",
            "finish_reason": "canceled",
        }
        assert json.loads(first.get("output") or "null") == want
        assert json.loads(store.get(jobs[0])["output"]) == want
        # and the second, which had streamed nothing since it started again, with no output
        assert "output" not in second and "output" not in store.get(jobs[1])
