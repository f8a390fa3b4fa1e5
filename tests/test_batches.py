"""OpenAI's Files and Batch API with the unmodified ``openai`` client against a real stack:
files uploaded, read, listed and deleted; a batch of 100 requests, a few malformed, ending
``completed`` with one output line per good request (bodies the client's own types parse)
and one error line per bad one; an image batch; batches listed across pages; a cancel; a
batch the tenant's quota cannot take failing whole with nothing created; another tenant
seeing nothing; a batch that completes though nobody reads it; one past its window ending
expired; only the process holding a batch's lock writing its end; the client's retry of a
create answered with the first attempt's batch.

Each test writes its own prompts: seeded requests are cached, and a repeat would be a hit.
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from typing import Any

import httpx
import openai
import pytest
import redis
import redis.asyncio
from openai.types import Batch
from openai.types.chat import ChatCompletion
from openai.types.images_response import ImagesResponse
from PIL import Image

from blaze_jobs.api_keys import create_key
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings
from tests.conftest import ADMIN_TOKEN, unique, wait_until
from tests.metrics_scrape import samples, value

pytestmark = pytest.mark.timeout(150)

CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"
JOBS = "/v1/jobs"


def tenant_client(stack: dict[str, Any], settings: Settings, **limits: Any) -> tuple[str, openai.OpenAI]:
    """A tenant of this test's own, and the client with a key of it."""
    name = f"batch-{uuid.uuid4().hex[:6]}"
    with redis.Redis.from_url(settings.redis_url) as client:
        secret, _ = create_key(client, settings, tenant=name, name="ci", **limits)
    return secret, openai.OpenAI(api_key=secret, base_url=stack["api_url"] + "/v1", timeout=60, max_retries=0)


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def echo_line(custom_id: str, **input: Any) -> dict[str, Any]:
    return line(custom_id, JOBS, {"engine": "echo", "input": {"marker": uuid.uuid4().hex, **input}})


def submit(openai_api: openai.OpenAI, lines: list[Any], endpoint: str) -> Batch:
    uploaded = openai_api.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    return openai_api.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]


def ended(openai_api: openai.OpenAI, batch_id: str, *, timeout: float = 90) -> Batch:
    """The batch once it reached an end status, read as the client reads it."""

    def look() -> Batch | None:
        batch = openai_api.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "cancelled", "expired") else None

    found: Batch = wait_until(look, timeout=timeout, what=f"batch {batch_id} to end", interval=0.3)
    return found


def lines_of(openai_api: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(text) for text in openai_api.files.content(file_id).text.splitlines()]


def test_a_file_is_uploaded_read_listed_across_pages_and_deleted(openai_api: openai.OpenAI) -> None:
    # Given two files uploaded by the client
    content = jsonl([echo_line("a"), echo_line("b")])
    first = openai_api.files.create(file=("first.jsonl", content), purpose="batch")
    second = openai_api.files.create(file=("second.jsonl", b"{}\n"), purpose="batch")

    # Then each is described as uploaded, and its bytes come back whole
    assert (first.object, first.purpose, first.bytes, first.filename) == ("file", "batch", len(content), "first.jsonl")
    assert first.expires_at is not None and first.expires_at > first.created_at
    assert openai_api.files.retrieve(first.id).model_dump() == first.model_dump()
    assert openai_api.files.content(first.id).content == content

    # And the list pages through both, newest first, a file at a time
    listed = [found.id for found in openai_api.files.list(limit=1, purpose="batch")]
    assert listed.index(second.id) < listed.index(first.id)
    assert openai_api.files.list(limit=1).has_more is True

    # When one is deleted, it is gone everywhere
    deleted = openai_api.files.delete(first.id)
    assert (deleted.id, deleted.deleted) == (first.id, True)
    with pytest.raises(openai.NotFoundError):
        openai_api.files.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        openai_api.files.content(first.id)
    assert first.id not in [found.id for found in openai_api.files.list()]

    # And a file asked to expire within the hour does
    brief = openai_api.files.create(
        file=("brief.jsonl", b"{}\n"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert brief.expires_at is not None and brief.expires_at - brief.created_at == 3600

    # And a purpose the deployment has no use for is the client's own error, naming it
    with pytest.raises(openai.BadRequestError) as refused:
        openai_api.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert refused.value.param == "purpose"


def test_a_batch_of_100_requests_completes_with_a_line_per_request_and_its_malformed_lines_in_the_error_file(
    openai_api: openai.OpenAI, stack: dict[str, Any], settings: Settings
) -> None:
    # Given 92 chat requests and 8 malformed lines
    prompt = unique("count to three")
    good = [
        line(f"chat-{i}", CHAT, {"messages": [{"role": "user", "content": f"{prompt} {i}"}], "max_tokens": 3}) for i in range(92)
    ]
    malformed: list[Any] = [
        b"{not json",
        line("", CHAT, {"messages": [{"role": "user", "content": "no custom id"}]}),
        line("chat-0", CHAT, {"messages": [{"role": "user", "content": "a custom id used before"}]}),
        line("wrong-url", IMAGES, {"prompt": "an image in a chat batch"}),
        line("unknown-model", CHAT, {"model": "gpt-nothing", "messages": [{"role": "user", "content": "hi"}]}),
        line("bad-param", CHAT, {"messages": [], "max_tokens": 3}),
        line("bad-body", CHAT, ["not", "an", "object"]),  # type: ignore[arg-type]
        {"custom_id": "get", "method": "GET", "url": CHAT, "body": {}},
    ]
    lines = good[:50] + malformed + good[50:]

    created_before = value(samples(stack["api_url"] + "/metrics"), "blaze_jobs_created_total", engine="llm", surface="openai")

    # When the client uploads them and makes a batch
    batch = submit(openai_api, lines, CHAT)

    # Then it is in progress at once, with every request counted
    assert batch.status == "in_progress" and batch.in_progress_at is not None
    assert batch.request_counts is not None and batch.request_counts.total == 100

    # And it completes, with 92 requests done and 8 failed
    done = ended(openai_api, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (92, 8)
    assert done.completed_at is not None and done.finalizing_at is not None

    # And the output file holds one line per good request, each a chat completion the client parses
    output = lines_of(openai_api, done.output_file_id)
    assert sorted(entry["custom_id"] for entry in output) == sorted(f"chat-{i}" for i in range(92))
    for entry in output:
        assert entry["error"] is None and entry["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(entry["response"]["body"])
        assert completion.choices[0].message.role == "assistant" and completion.usage is not None
        assert entry["response"]["request_id"] == completion.id

    # And the error file one line per malformed one, saying what is wrong
    errors = lines_of(openai_api, done.error_file_id)
    assert len(errors) == 8
    codes = {entry["custom_id"]: entry["error"]["code"] for entry in errors}
    assert codes["wrong-url"] == "invalid_url" and codes["unknown-model"] == "model_not_found"
    assert codes["chat-0"] == "duplicate_custom_id" and codes["get"] == "invalid_method"
    assert codes.get(None) in ("invalid_json", "missing_custom_id")
    assert "messages" in next(e["error"]["message"] for e in errors if e["custom_id"] == "bad-param")

    # And each request was a job of its own on the llm queue, naming its batch and line
    with httpx.Client(base_url=stack["api_url"], headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        job = http.get(f"/v1/jobs/{output[0]['response']['request_id']}").json()
    assert job["engine"] == "llm" and job["status"] == "succeeded"
    with redis.Redis.from_url(settings.redis_url) as client:
        fields = client.hmget(Keys(settings.redis_prefix).job(job["id"]), "batch", "custom_id", "surface")
    assert [field.decode() for field in fields] == [batch.id, output[0]["custom_id"], "openai"]

    # And the API counted the 92 jobs it made (the malformed lines made none)
    created = value(samples(stack["api_url"] + "/metrics"), "blaze_jobs_created_total", engine="llm", surface="openai")
    assert created - created_before == 92


def test_an_image_batch_answers_urls_and_base64_as_the_images_route_does(openai_api: openai.OpenAI) -> None:
    # Given three small image requests, one asking for base64
    prompt = unique("a red square")
    body = {"size": "64x64", "num_inference_steps": 2}
    lines = [
        line("url-0", IMAGES, {"prompt": f"{prompt} 0", **body}),
        line("url-1", IMAGES, {"prompt": f"{prompt} 1", "n": 2, **body}),
        line("b64", IMAGES, {"prompt": f"{prompt} 2", "response_format": "b64_json", **body}),
    ]

    # When they run as a batch
    done = ended(openai_api, submit(openai_api, lines, IMAGES).id)

    # Then each line's body is an images response the client parses
    assert done.status == "completed" and done.error_file_id is None
    output = {
        entry["custom_id"]: ImagesResponse.model_validate(entry["response"]["body"])
        for entry in lines_of(openai_api, done.output_file_id)
    }
    assert [len(output[name].data or []) for name in ("url-0", "url-1", "b64")] == [1, 2, 1]
    url = (output["url-0"].data or [])[0].url
    assert url is not None and httpx.get(url).status_code == 200  # a signed URL: no key needed
    image = Image.open(io.BytesIO(base64.b64decode((output["b64"].data or [])[0].b64_json or "")))
    assert image.size == (64, 64)


def test_batches_list_across_pages_newest_first(openai_api: openai.OpenAI) -> None:
    # Given three batches of one echo job each
    made = [submit(openai_api, [echo_line("only")], JOBS).id for _ in range(3)]

    # When the client lists them two at a time
    listed = [batch.id for batch in openai_api.batches.list(limit=2)]

    # Then every page follows, newest first
    assert [batch_id for batch_id in listed if batch_id in made] == list(reversed(made))
    first = openai_api.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more is True


def test_a_canceled_batch_stops_its_jobs_and_ends_cancelled_with_what_finished(openai_api: openai.OpenAI) -> None:
    # Given a batch of slow echo jobs (the echo worker runs one at a time)
    batch = submit(openai_api, [echo_line(f"slow-{i}", sleep_ms=2000) for i in range(4)], JOBS)

    # When the client cancels it
    canceling = openai_api.batches.cancel(batch.id)

    # Then it is cancelling, then cancelled, every job ended with nothing left to run
    assert canceling.status == "cancelling" and canceling.cancelling_at is not None
    done = ended(openai_api, batch.id, timeout=30)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts is not None and done.request_counts.completed == 0
    errors = lines_of(openai_api, done.error_file_id)
    assert sorted(entry["custom_id"] for entry in errors) == [f"slow-{i}" for i in range(4)]
    assert all(entry["response"]["body"]["status"] == "canceled" for entry in errors)

    # And a batch that ended cannot be canceled again: the client's own error, not retried
    with pytest.raises(openai.BadRequestError):
        openai_api.batches.cancel(batch.id)


def test_a_batch_over_the_tenants_quota_fails_whole_and_creates_nothing(stack: dict[str, Any], settings: Settings) -> None:
    # Given a tenant whose key allows 5 jobs queued or running
    secret, client = tenant_client(stack, settings, max_jobs=5)
    with client:
        # When it makes a batch of 10
        batch = submit(client, [echo_line(f"line-{i}") for i in range(10)], JOBS)

        # Then the batch failed, saying why, and no job was made
        assert batch.status == "failed" and batch.failed_at is not None
        assert batch.errors is not None and batch.errors.data
        assert batch.errors.data[0].code == "quota_exceeded"
        with httpx.Client(base_url=stack["api_url"], headers={"Authorization": f"Bearer {secret}"}) as http:
            assert http.get("/v1/jobs").json()["jobs"] == []

        # And a batch within the quota runs
        assert ended(client, submit(client, [echo_line("fits")], JOBS).id).status == "completed"


def test_another_tenant_sees_neither_the_batch_nor_its_files(
    openai_api: openai.OpenAI, stack: dict[str, Any], settings: Settings
) -> None:
    # Given a batch of the default tenant, ended, with its files
    done = ended(openai_api, submit(openai_api, [echo_line("mine")], JOBS).id)
    assert done.output_file_id is not None

    # Then another tenant gets 404 for the batch, its input and output, and lists none of them
    _, other = tenant_client(stack, settings)
    with other:
        for call in (
            lambda: other.batches.retrieve(done.id),
            lambda: other.batches.cancel(done.id),
            lambda: other.files.retrieve(done.input_file_id),
            lambda: other.files.content(done.output_file_id or ""),
            lambda: other.files.delete(done.input_file_id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert done.id not in [batch.id for batch in other.batches.list()]
        assert done.input_file_id not in [file.id for file in other.files.list()]
        # Nor can it make a batch of the other tenant's file
        with pytest.raises(openai.NotFoundError):
            other.batches.create(input_file_id=done.input_file_id, endpoint=JOBS, completion_window="24h")  # type: ignore[arg-type]
    # And the owner still reads its file
    assert openai_api.files.retrieve(done.input_file_id).id == done.input_file_id


def test_a_batch_nobody_reads_completes_and_a_jobs_line_answers_the_job_view(
    openai_api: openai.OpenAI, settings: Settings
) -> None:
    # Given a batch of two echo jobs, never read after its creation
    batch = submit(openai_api, [echo_line("one", text="hello"), echo_line("two")], JOBS)
    keys = Keys(settings.redis_prefix)

    # Then it completes by itself (each API process advances the open batches)
    with redis.Redis.from_url(settings.redis_url) as client:
        wait_until(lambda: client.hget(keys.batch(batch.id), "status") == b"completed", timeout=30, what="the batch to complete")

    # And each line's body is the job as GET /v1/jobs/{id} shows it
    done = openai_api.batches.retrieve(batch.id)
    output = {entry["custom_id"]: entry["response"]["body"] for entry in lines_of(openai_api, done.output_file_id)}
    assert output["one"]["status"] == "succeeded" and output["one"]["output"]["text"] == "hello"
    assert output["one"]["engine"] == "echo" and output["one"]["urls"]["get"].endswith(output["one"]["id"])


def test_a_jobs_line_whose_input_image_no_job_could_read_fails_that_line_only(openai_api: openai.OpenAI) -> None:
    # Given a batch of an echo job and two image jobs whose input images cannot be read
    not_an_image = "data:image/png;base64," + base64.b64encode(b"not an image").decode()

    def image_line(custom_id: str, **input: Any) -> dict[str, Any]:
        return line(custom_id, JOBS, {"engine": "diffusion", "input": {"prompt": unique("a fox"), **input}})

    lines = [
        echo_line("echo", text="hello"),
        image_line("not-an-image", image=not_an_image),
        image_line("mask-alone", mask=not_an_image),
    ]

    # When it runs
    done = ended(openai_api, submit(openai_api, lines, JOBS).id)

    # Then the echo job completes and each image line is an error naming its field, as a create answers it
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    assert [entry["custom_id"] for entry in lines_of(openai_api, done.output_file_id)] == ["echo"]
    errors = {entry["custom_id"]: entry["error"]["message"] for entry in lines_of(openai_api, done.error_file_id)}
    assert "input.image" in errors["not-an-image"] and "line 2" in errors["not-an-image"], errors
    assert "input.mask" in errors["mask-alone"], errors


def test_a_retried_create_answers_the_batch_the_first_attempt_made(openai_api: openai.OpenAI, stack: dict[str, Any]) -> None:
    # Given an uploaded file
    uploaded = openai_api.files.create(file=("batch.jsonl", jsonl([echo_line("once")])), purpose="batch")
    body = {"input_file_id": uploaded.id, "endpoint": JOBS, "completion_window": "24h"}
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    # When the client's first attempt and its retry both arrive (the first answer was lost)
    with httpx.Client(base_url=stack["api_url"], headers=headers, timeout=30) as http:
        first = http.post("/v1/batches", json=body, headers={"x-stainless-retry-count": "0"}).json()
        retry = http.post("/v1/batches", json=body, headers={"x-stainless-retry-count": "1"}).json()
        # (a new first attempt is a new batch: asking twice is the user's choice)
        again = http.post("/v1/batches", json=body, headers={"x-stainless-retry-count": "0"}).json()

    # Then the retry answers the same batch, and made no second one
    assert retry["id"] == first["id"] and again["id"] != first["id"]


def test_a_whole_file_problem_fails_the_batch_and_a_bad_create_is_the_clients_own_error(openai_api: openai.OpenAI) -> None:
    # Given a file with no request line at all
    batch = submit(openai_api, [b"   "], JOBS)

    # Then the batch failed, saying why
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == "empty_file"

    # And an unknown endpoint, window or file is refused, naming the parameter
    uploaded = openai_api.files.create(file=("b.jsonl", jsonl([echo_line("x")])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        openai_api.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    assert refused.value.param == "endpoint"
    with pytest.raises(openai.BadRequestError) as refused:
        openai_api.batches.create(input_file_id=uploaded.id, endpoint=JOBS, completion_window="1h")  # type: ignore[arg-type]
    assert refused.value.param == "completion_window"
    with pytest.raises(openai.NotFoundError):
        openai_api.batches.create(input_file_id="file-nothing", endpoint=JOBS, completion_window="24h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        openai_api.batches.retrieve("batch_nothing")


def test_a_batch_past_its_window_cancels_what_has_not_run_and_ends_expired(openai_api: openai.OpenAI, settings: Settings) -> None:
    # Given a batch of slow echo jobs whose 24 h window has run out (moved into the past)
    batch = submit(openai_api, [echo_line(f"late-{i}", sleep_ms=2000) for i in range(3)], JOBS)
    with redis.Redis.from_url(settings.redis_url) as client:
        client.hset(Keys(settings.redis_prefix).batch(batch.id), "expires_at", repr(time.time() - 1))

    # When it is next looked at, Then it ends expired, its jobs canceled, none left to run
    done = ended(openai_api, batch.id, timeout=30)
    assert done.status == "expired" and done.expired_at is not None
    errors = lines_of(openai_api, done.error_file_id)
    assert sorted(entry["custom_id"] for entry in errors) == [f"late-{i}" for i in range(3)]
    assert all(entry["response"]["body"]["status"] == "canceled" for entry in errors)


def test_an_ended_batch_cannot_be_cancelled_and_keeps_its_files(openai_api: openai.OpenAI) -> None:
    # Given a batch that has completed
    done = ended(openai_api, submit(openai_api, [echo_line("kept")], JOBS).id)
    assert done.status == "completed" and done.output_file_id is not None

    # When the client cancels it, Then it is refused as not cancellable
    with pytest.raises(openai.BadRequestError) as refused:
        openai_api.batches.cancel(done.id)
    assert refused.value.code == "batch_not_cancellable"

    # And the batch is still completed, with the same output file
    again = openai_api.batches.retrieve(done.id)
    assert again.status == "completed" and again.output_file_id == done.output_file_id
