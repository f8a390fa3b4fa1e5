"""Long-poll and server-sent events: a client learns of a job's end the moment it happens,
sees its progress on the way, and misses nothing across a reconnect."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest
import redis

from blaze_jobs.client import BlazeClient, ServerEvent, SSEParser
from blaze_jobs.events import append_event, stream_key
from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from blaze_jobs.store import JobStore
from tests.conftest import AUTH, start_api, wait_until
from tests.test_event_position import commands_during

# Generous: the first test to use the stack also waits for it to start.
pytestmark = pytest.mark.timeout(180)


def read_events(http: httpx.Client, job_id: str, *, last_event_id: str | None = None, limit: int = 1000) -> Iterator[ServerEvent]:
    """Raw SSE from the API, parsed, until the server ends the stream (or ``limit`` events)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(30, read=30)) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        parser = SSEParser()
        count = 0
        for line in response.iter_lines():
            event = parser.feed(line)
            if event is not None:
                yield event
                count += 1
                if count >= limit:
                    return


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# --- long-poll ----------------------------------------------------------------------------


def test_a_long_poll_returns_as_soon_as_the_job_ends(client: BlazeClient, http: httpx.Client) -> None:
    # Given a job that runs for a second
    job = client.submit("echo", {"sleep_ms": 1000})

    # When a client long-polls it for up to ten seconds
    response = http.get(f"/v1/jobs/{job['id']}", params={"wait": 10})
    answered = time.time()

    # Then the answer is the ended job, sent on its end, not when the ten seconds ran out
    # (the margin is wide so that a busy machine cannot break it; a wait that ran its
    # course would answer nine seconds after the end)
    ended = response.json()
    assert response.status_code == 200 and ended["status"] == "succeeded"
    assert 0 <= answered - seconds(ended["completed_at"]) < 5
    assert ended == client.get(job["id"])


def test_a_long_poll_returns_the_job_as_it_stands_when_the_wait_runs_out(client: BlazeClient, http: httpx.Client) -> None:
    # Given a job that runs for half a minute
    job = client.submit("echo", {"sleep_ms": 30_000})
    # When a client long-polls it for half a second
    started = time.monotonic()
    response = http.get(f"/v1/jobs/{job['id']}", params={"wait": 0.5})
    took = time.monotonic() - started
    # Then it gets the job as it stands, after the wait and long before the job's end
    assert response.status_code == 200 and response.json()["status"] in ("queued", "running")
    assert 0.45 <= took < 15
    client.cancel(job["id"])


def test_a_wait_beyond_the_bound_or_for_no_job_is_refused(http: httpx.Client) -> None:
    too_long = http.get("/v1/jobs/anything", params={"wait": 61})
    assert too_long.status_code == 422 and too_long.json()["errors"][0]["field"] == "wait"
    missing = http.get("/v1/jobs/no-such-job", params={"wait": 1})
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


def test_create_honours_prefer_wait(http: httpx.Client) -> None:
    # Given a quick job, created with Prefer: wait
    started = time.monotonic()
    response = http.post("/v1/jobs", json={"engine": "echo", "input": {"sleep_ms": 200}}, headers={"Prefer": "wait=30"})

    # Then the answer is the ended job, as soon as it ended (not when the 30 s ran out)
    assert response.status_code == 202 and response.json()["status"] == "succeeded"
    assert time.monotonic() - started < 20
    # and without the preference, the job as accepted
    plain = http.post("/v1/jobs", json={"engine": "echo", "input": {"sleep_ms": 200}})
    assert plain.json()["status"] == "queued"


def test_a_create_that_prefers_to_wait_does_not_read_the_job_it_made(http: httpx.Client, settings: Settings) -> None:
    # Given a quick job, created with Prefer: wait, Redis watched
    answers: list[httpx.Response] = []

    def create() -> None:
        answers.append(http.post("/v1/jobs", json={"engine": "echo", "input": {"sleep_ms": 50}}, headers={"Prefer": "wait=30"}))

    sent = commands_during(create, about=Keys(settings.redis_prefix).job(""))

    # Then it answers the ended job, having watched its events from its creation on: the job's
    # record is read whole (HGETALL) by the scripts only, not by the API
    assert answers[0].status_code == 202 and answers[0].json()["status"] == "succeeded"
    assert not [command for kind, command in sent if kind != "lua" and command.startswith("HGETALL")]


# --- server-sent events -------------------------------------------------------------------


#: Steps of the progress test's image job: about 2 s of denoising on one core here.
PROGRESS_STEPS = 120


def test_an_event_stream_shows_progress_and_ends_with_the_final_job(client: BlazeClient, http: httpx.Client) -> None:
    # Given an image job of many steps: progress is reported at most every 0.5 s, so the job
    # must outlast that on the fastest host (30 steps took 0.45 s here, on one idle core)
    job = client.submit("diffusion", {"prompt": "a harbour at night", "num_inference_steps": PROGRESS_STEPS})

    # When a client follows its events
    events = list(read_events(http, job["id"]))

    # Then the first is the job as it stood, then it started, made progress, and ended
    kinds = [e.event for e in events]
    assert kinds[0] == "job" and events[0].data["id"] == job["id"]
    assert kinds[-1] == "job.completed" and kinds.count("job.completed") == 1
    # (a client that connects after the start sees it in the first event's status, and
    # then gets no job.started; one that connects before gets exactly one)
    assert kinds.count("job.started") == (1 if events[0].data["status"] == "queued" else 0), kinds
    progress = [e.data for e in events if e.event == "job.progress"]
    assert len(progress) >= 2, kinds
    assert all(p["total"] == PROGRESS_STEPS for p in progress)
    steps = [p["step"] for p in progress]
    assert steps == sorted(set(steps)) and 1 <= steps[0] and steps[-1] <= PROGRESS_STEPS
    # at most one progress event per half second
    times = [int((e.id or "").split("-")[0]) / 1000 for e in events if e.event == "job.progress"]
    assert all(b - a >= 0.45 for a, b in zip(times, times[1:], strict=False)), times
    # and the last event is the final job, as GET shows it, progress complete
    final = events[-1].data
    assert final["status"] == "succeeded" and final["progress"] == {"step": PROGRESS_STEPS, "total": PROGRESS_STEPS}
    assert final == client.get(job["id"])
    ids = [e.id for e in events]
    assert len(set(ids[1:])) == len(ids) - 1


def test_a_late_client_gets_the_final_job_at_once(client: BlazeClient, http: httpx.Client) -> None:
    job = client.wait(client.submit("echo", {"n": 1})["id"], timeout=30)
    started = time.monotonic()
    events = list(read_events(http, job["id"]))
    assert [e.event for e in events] == ["job"] and events[0].data == job
    # (a stream that waited for more would first send a keep-alive, 15 s later)
    assert time.monotonic() - started < 10


def test_a_client_that_reconnects_with_last_event_id_misses_nothing(client: BlazeClient, http: httpx.Client) -> None:
    # Given a client that saw only the first event of a running job, then lost its connection
    job = client.submit("echo", {"sleep_ms": 800})
    (first,) = read_events(http, job["id"], limit=1)
    assert first.event == "job" and first.data["status"] in ("queued", "running")
    client.wait(job["id"], timeout=30)

    # When it reconnects with the id of the last event it saw
    resumed = list(read_events(http, job["id"], last_event_id=first.id))

    # Then it gets exactly what happened since: no `job` snapshot, no repeats, up to the end
    replay = list(read_events(http, job["id"], last_event_id="0-0"))
    assert [e.event for e in replay] == ["job.started", "job.completed"]
    expected = [e for e in replay if tuple(map(int, (e.id or "").split("-"))) > tuple(map(int, (first.id or "").split("-")))]
    assert [(e.id, e.event) for e in resumed] == [(e.id, e.event) for e in expected]
    assert resumed[-1].event == "job.completed" and resumed[-1].data == client.get(job["id"])

    # and a client that had seen the end gets nothing more, at once
    assert list(read_events(http, job["id"], last_event_id=replay[-1].id)) == []


def test_events_of_no_job_are_a_404(http: httpx.Client) -> None:
    response = http.get("/v1/jobs/no-such-job/events")
    assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"


def test_an_event_stream_says_when_a_running_job_is_canceled(client: BlazeClient, http: httpx.Client) -> None:
    job = client.submit("echo", {"sleep_ms": 10_000})
    wait_until(lambda: client.get(job["id"])["status"] == "running", timeout=10, what="the job to start")
    stream = read_events(http, job["id"])
    assert next(stream).event == "job"
    client.cancel(job["id"])
    rest = list(stream)
    assert rest[-1].event == "job.completed" and rest[-1].data["status"] == "canceled"


def test_the_raw_stream_is_plain_server_sent_events(client: BlazeClient, http: httpx.Client) -> None:
    job = client.wait(client.submit("echo", {"n": 2})["id"], timeout=30)
    text = http.get(f"/v1/jobs/{job['id']}/events").text
    blocks = [b for b in text.split("\n\n") if b]
    assert blocks[0] == "retry: 1000"
    lines = blocks[1].split("\n")
    assert lines[0].startswith("id: ") and lines[1] == "event: job" and json.loads(lines[2][len("data: ") :]) == job


# --- what a stream holds ------------------------------------------------------------------


def test_a_job_with_as_many_events_as_the_bounds_allow_replays_whole_from_0_0(http: httpx.Client, settings: Settings) -> None:
    # Given a running text job that streamed a piece of text and a progress report for each
    # of the most tokens a job may ask for, through the worker's own event step
    with redis.Redis.from_url(settings.redis_url) as client:
        store = JobStore(client, settings)
        job_id = str(uuid.uuid4())
        store.create(
            new_record(
                job_id=job_id,
                tenant="default",
                engine="llm",
                model=settings.llm_model,
                input={"prompt": "long"},
                created_at=time.time(),
            )
        )
        store.transition(job_id, allowed=(JobStatus.queued,), to=JobStatus.running, started_at=repr(time.time()))
        tokens = settings.llm_max_new_tokens
        for n in range(tokens):
            append_event(
                client, prefix=settings.redis_prefix, job_id=job_id, kind="job.delta", fields={"text": f" {n}"}, settings=settings
            )
            progress = json.dumps({"step": n + 1, "total": tokens})
            fields = {"progress": progress}
            append_event(
                client,
                prefix=settings.redis_prefix,
                job_id=job_id,
                kind="job.progress",
                fields=fields,
                job_fields=fields,
                settings=settings,
            )
        text = "".join(f" {n}" for n in range(tokens))
        output = json.dumps({"text": text, "finish_reason": "length"})
        store.transition(
            job_id, allowed=(JobStatus.running,), to=JobStatus.succeeded, output=output, completed_at=repr(time.time())
        )

    # When a client replays its stream from the start
    replay = list(read_events(http, job_id, last_event_id="0-0", limit=10_000))

    # Then it is all there: the start, every piece and report in order, the end
    kinds = [e.event for e in replay]
    assert kinds[0] == "job.started" and kinds[-1] == "job.completed", (kinds[:3], len(kinds))
    assert "".join(e.data["text"] for e in replay if e.event == "job.delta") == text
    assert [e.data["step"] for e in replay if e.event == "job.progress"] == list(range(1, tokens + 1))
    assert replay[0].data["input"] == {"prompt": "long"} and replay[-1].data["output"]["text"] == text


def test_events_do_not_copy_the_jobs_input_yet_show_it(client: BlazeClient, http: httpx.Client, settings: Settings) -> None:
    # Given a job with a large input (echo answers with it, so its output is as large)
    blob = "x" * 100_000
    job = client.submit("echo", {"blob": blob, "sleep_ms": 200})
    ended = http.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
    assert ended["status"] == "succeeded" and ended["input"]["blob"] == blob

    # When its events are read back, from Redis and as a client sees them
    with redis.Redis.from_url(settings.redis_url) as redis_client:
        entries = redis_client.xrange(stream_key(settings.redis_prefix, job["id"]))
    stored = sum(len(k) + len(v) for _, fields in entries for k, v in fields.items())
    replay = list(read_events(http, job["id"], last_event_id="0-0"))

    # Then the stream holds the output once and the input never (it was twice the input,
    # and the output too, before), while every event a client gets shows the whole job
    assert len(blob) <= stored < 1.2 * len(blob), stored
    assert [e.event for e in replay] == ["job.started", "job.completed"]
    assert all(e.data["input"] == {"blob": blob, "sleep_ms": 200} for e in replay)
    assert replay[-1].data == client.get(job["id"])


def test_past_the_waiter_bound_a_stream_is_refused_up_front_and_a_create_that_prefers_to_wait_still_answers_its_job(
    own_stack: Stack,
) -> None:
    # Given an API that holds one waiter at a time, and no worker (jobs stay queued)
    api_url = start_api(own_stack, BLAZE_MAX_WAITERS="1")
    with httpx.Client(base_url=api_url, timeout=30, headers=AUTH) as http:
        first = http.post("/v1/jobs", json={"engine": "echo", "input": {"n": 1}}).json()
        # When one client follows a job's events (and so holds the one place)
        with http.stream("GET", f"/v1/jobs/{first['id']}/events") as held:
            assert held.status_code == 200
            # (the place is taken once a long-poll is refused for want of one)
            wait_until(
                lambda: http.get(f"/v1/jobs/{first['id']}", params={"wait": 0.1}).status_code == 503,
                timeout=15,
                what="the stream to hold the one place",
            )

            # Then a second stream is refused before any event: 503 problem+json, retry later
            second = http.get(f"/v1/jobs/{first['id']}/events")
            assert second.status_code == 503, second.text
            assert second.headers["content-type"].startswith("application/problem+json")
            assert int(second.headers["retry-after"]) > 0

            # And a create that prefers to wait answers the job it stored (never a 503, which
            # would have the client create it again)
            created = http.post("/v1/jobs", json={"engine": "echo", "input": {"n": 2}}, headers={"Prefer": "wait=5"})
            assert created.status_code == 202 and created.json()["status"] == "queued", created.text
            assert http.get(f"/v1/jobs/{created.json()['id']}").json()["status"] == "queued"
