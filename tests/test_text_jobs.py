"""Text jobs end to end: HTTP submit, a real ``blaze worker --engine llm`` on the built-in
tiny model, poll, stream, cancel.

Most jobs are greedy (temperature 0): the tiny model's greedy text runs to
``max_new_tokens`` without an end-of-sequence token, so usage is exact. Each test writes
its own prompts: greedy and seeded jobs are cached, and a repeated request would be a hit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from blaze_jobs.client import BlazeClient
from blaze_jobs.events import stream_key
from blaze_jobs.settings import Settings
from blaze_jobs.store import Keys
from tests.conftest import ADMIN_TOKEN, wait_until

pytestmark = pytest.mark.timeout(120)


def greedy(client: BlazeClient, prompt: str, max_new_tokens: int, **input: Any) -> dict[str, Any]:
    return client.submit("llm", {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0, **input})


def generating(client: BlazeClient, job_id: str) -> dict[str, Any]:
    """The job once it has made its first tokens (its progress says so)."""
    return wait_until(
        lambda: (job := client.get(job_id))["progress"] and job["progress"]["step"] > 0 and job,
        timeout=60,
        what="the job to generate",
    )


def streamed(settings: Settings, job_id: str) -> None:
    """Wait until the job has streamed some text (a first token may be part of a character,
    which streams nothing yet)."""
    with redis.Redis.from_url(settings.redis_url) as r:

        def some_text() -> bool:
            entries = r.xrange(stream_key(settings.redis_prefix, job_id))
            return any(fields.get(b"type") == b"job.delta" and fields.get(b"text") for _, fields in entries)

        wait_until(some_text, timeout=60, what="the job to stream some text")


def let_go(client: BlazeClient, settings: Settings, job_id: str) -> dict[str, Any]:
    """A canceled text job's output once its worker has let it go (dropped its lease): the
    text it streamed, which the record holds from the cancel on."""
    lease = Keys(settings.redis_prefix).lease(job_id)
    with redis.Redis.from_url(settings.redis_url) as r:
        wait_until(lambda: not r.exists(lease), timeout=60, what="the worker to let the canceled job go")
    return client.get(job_id)["output"]


def events_of(http: httpx.Client, job_id: str) -> Iterator[tuple[str, Any]]:
    """The job's server-sent events as (type, data), until the stream ends."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as response:
        assert response.status_code == 200
        kind, data = "message", ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif not line and data:
                yield kind, json.loads(data)
                kind, data = "message", ""


def test_concurrent_text_jobs_of_different_lengths_all_finish_with_their_usage(client: BlazeClient) -> None:
    # Given twelve jobs of different lengths, submitted at once
    lengths = [4 + 6 * n for n in range(12)]
    jobs = [greedy(client, f"Concurrent job {n}: the river ran" + " fast" * n, length) for n, length in enumerate(lengths)]
    assert all(job["model"] == "builtin:tiny-lm" for job in jobs)

    # When the worker has run them
    done = [client.wait(job["id"], timeout=90) for job in jobs]

    # Then each made exactly the tokens it asked for, and says so
    for job, length in zip(done, lengths, strict=True):
        assert job["status"] == "succeeded", job["error"]
        output = job["output"]
        assert output["finish_reason"] == "length" and output["text"]
        assert output["usage"]["completion_tokens"] == length and output["usage"]["prompt_tokens"] > 5
    # and they shared the device, joining and leaving one another's batch
    assert max(job["metrics"]["batch_size"] for job in done) > 1


def test_a_short_job_that_arrives_while_a_long_one_runs_finishes_first(client: BlazeClient) -> None:
    # Given a long job that is generating
    long = greedy(client, "A long story begins on a cold morning", 600)
    generating(client, long["id"])

    # When a short job arrives
    short = client.wait(greedy(client, "A short note", 5)["id"], timeout=30)

    # Then it is done while the long one still runs: it joined the running batch
    assert short["status"] == "succeeded", short["error"]
    assert client.get(long["id"])["status"] == "running"
    assert short["output"]["usage"]["completion_tokens"] == 5
    assert short["metrics"]["batch_size"] == 2
    long = client.wait(long["id"], timeout=90)
    assert long["output"]["usage"]["completion_tokens"] == 600
    assert short["completed_at"] < long["completed_at"]


def test_a_stop_string_ends_the_text_before_it(client: BlazeClient) -> None:
    # Given the text a prompt makes, and a stop string from its middle
    full = client.wait(greedy(client, "Stop strings: the lighthouse stood", 40)["id"], timeout=30)["output"]["text"]
    stop = full[12:15]

    # When the same prompt runs with that stop string
    job = client.wait(greedy(client, "Stop strings: the lighthouse stood", 40, stop=["\u2603", stop])["id"], timeout=30)

    # Then the text ends where the stop string first appears
    assert job["status"] == "succeeded", job["error"]
    assert job["output"]["text"] == full[: full.find(stop)]
    assert job["output"]["finish_reason"] == "stop"
    assert job["output"]["usage"]["completion_tokens"] < 40


def test_a_chat_job_is_rendered_with_the_model_chat_template(client: BlazeClient) -> None:
    # Given a chat, and the same chat as the model's template (ChatML) writes it out
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What day is it?"}]
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat day is it?<|im_end|>\n<|im_start|>assistant\n"

    # When both run
    chat = client.wait(client.submit("llm", {"messages": messages, "max_new_tokens": 8, "temperature": 0})["id"], timeout=30)
    plain = client.wait(greedy(client, rendered, 8)["id"], timeout=30)

    # Then they are the same generation
    assert chat["status"] == plain["status"] == "succeeded", (chat["error"], plain["error"])
    assert chat["output"] == plain["output"]
    assert chat["output"]["usage"]["completion_tokens"] == 8


def test_a_seeded_text_job_is_reproducible_and_served_from_the_cache(client: BlazeClient) -> None:
    # Given a sampled job with a seed, run once
    request = {"prompt": "Seeded: the market opened at nine", "max_new_tokens": 12, "temperature": 0.9, "seed": 42}
    first = client.wait(client.submit("llm", request)["id"], timeout=30)
    assert first["status"] == "succeeded", first["error"]
    assert first["output"]["seed"] == 42 and first["metrics"]["cache_hit"] is False

    # When the same request comes again
    again = client.wait(client.submit("llm", request)["id"], timeout=30)

    # Then it is the same text, from the cache
    assert again["output"] == first["output"] and again["metrics"]["cache_hit"] is True


def test_streamed_deltas_concatenate_to_the_final_text(client: BlazeClient, http: httpx.Client) -> None:
    # Given a job whose events a client follows from the start
    job = greedy(client, "Streaming: the train arrived at the station", 48)

    # When the stream ends
    deltas, final = [], None
    for kind, data in events_of(http, job["id"]):
        if kind == "job.delta":
            deltas.append(data["text"])
        elif kind == "job.completed":
            final = data

    # Then the pieces streamed as they came make up the final text
    assert final is not None and final["status"] == "succeeded", final
    assert len(deltas) > 1
    assert "".join(deltas) == final["output"]["text"]


def test_blaze_submit_stream_prints_the_text(stack: dict[str, Any], test_env: dict[str, str], client: BlazeClient) -> None:
    # When a text job is submitted with --stream
    argv = [
        "submit",
        "--engine",
        "llm",
        "--stream",
        "--input",
        "prompt=The CLI streams: the cat sat",
        "--input",
        "max_new_tokens=20",
    ]
    env = {**test_env, "BLAZE_API_URL": stack["api_url"], "BLAZE_API_KEY": ADMIN_TOKEN, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [sys.executable, "-m", "blaze_jobs.cli", *argv, "--input", "temperature=0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Then its text went to stdout, and the job's timeline to stderr
    assert done.returncode == 0, done.stderr
    job_id = done.stderr.split("submitted job ", 1)[1].split()[0]
    job = client.get(job_id)
    assert done.stdout == job["output"]["text"] + "\n"
    assert f"job {job_id} succeeded" in done.stderr


def test_canceling_a_running_text_job_stops_it_at_its_next_token(client: BlazeClient, settings: Settings) -> None:
    # Given a text job that would generate for a long while
    job = greedy(client, "Cancel me: the weather changed in the afternoon", 1000)
    generating(client, job["id"])

    # When it is canceled, and its worker has let it go
    assert client.cancel(job["id"])["status"] == "canceled"
    assert let_go(client, settings, job["id"])["usage"]["completion_tokens"] < 1000

    # Then it has left the device: the next job runs alone, and the canceled one stays canceled
    nxt = client.wait(greedy(client, "After the cancel", 3)["id"], timeout=30)
    assert nxt["status"] == "succeeded", nxt["error"]
    assert nxt["metrics"]["batch_size"] == 1
    assert client.get(job["id"])["status"] == "canceled"


def test_a_canceled_text_job_keeps_its_text_so_far(client: BlazeClient, settings: Settings) -> None:
    job = greedy(client, "Keep my text: the lake froze in winter", 1000)
    streamed(settings, job["id"])

    client.cancel(job["id"])

    output = let_go(client, settings, job["id"])
    assert output["finish_reason"] == "canceled" and output["text"]
    assert 0 < output["usage"]["completion_tokens"] < 1000


def test_a_canceled_text_job_is_never_served_from_the_cache(client: BlazeClient, settings: Settings) -> None:
    # Given a greedy job (so cacheable) canceled while it generates
    request = {"prompt": "Never cached: the garden was full of roses", "max_new_tokens": 1000, "temperature": 0}
    job = client.submit("llm", request)
    generating(client, job["id"])
    client.cancel(job["id"])
    let_go(client, settings, job["id"])

    # When the same request comes again
    again = client.submit("llm", request)
    client.cancel(again["id"]) if again["status"] in ("queued", "running") else None

    # Then it was not answered with the canceled job's partial text
    assert not again["metrics"]["cache_hit"], again["output"]


@pytest.mark.parametrize(
    ("input", "field"),
    [
        ({"messages": []}, "input.messages"),
        ({"prompt": "x", "max_new_tokens": 100_000}, "input.max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": "ten"}, "input.max_new_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "input.temperature"),
        ({"prompt": "x", "top_p": 0}, "input.top_p"),
        ({"prompt": "x", "stop": "\n"}, "input.stop"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "input.stop"),
        ({"prompt": "x", "colour": "blue"}, "input.colour"),
        ({"messages": [{"role": "robot", "content": "beep"}]}, "input.messages.0.role"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}, "input"),
        ({}, "input"),
    ],
)
def test_bad_text_input_is_a_422_problem_naming_the_field(http: httpx.Client, input: dict[str, Any], field: str) -> None:
    response = http.post("/v1/jobs", json={"engine": "llm", "input": input})

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert field in [error["field"] for error in problem["errors"]], problem


def test_a_text_model_not_configured_is_refused(http: httpx.Client) -> None:
    response = http.post("/v1/jobs", json={"engine": "llm", "model": "gpt2", "input": {"prompt": "x"}})

    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "model", "message": "unknown model 'gpt2' for engine llm; known: ['builtin:tiny-lm']"}
    ]
