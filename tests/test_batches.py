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

import asyncio
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
from pydantic import TypeAdapter

from api import openai_batches
from api.problems import InputProblem
from blaze_jobs import batch_lines, batches, files
from blaze_jobs.api_keys import create_key
from blaze_jobs.jobs import JobCreate
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from blaze_jobs.store import text
from tests.conftest import ADMIN_TOKEN, start_api, unique, wait_until

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
    assert [value.decode() for value in fields] == [batch.id, output[0]["custom_id"], "openai"]


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


def test_only_the_process_holding_a_batchs_lock_writes_its_end(settings: Settings) -> None:
    # Given a batch whose finalization process "a" holds
    async def story() -> None:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            record = batches.new_record(
                batch_id=batches.new_batch_id(), tenant="t", endpoint=JOBS, input_file_id="file-x", metadata=None, base_url=""
            )
            await batches.store_new(client, settings, record)
            assert await batches.lock(client, settings, record["id"], "a")
            assert not await batches.lock(client, settings, record["id"], "b")

            # When process "b" tries to end it, Then nothing is written
            assert not await batches.finish(client, settings, record, holder="b", files=[], status="completed")
            assert (await batches.get(client, settings, record["id"], tenant="t"))["status"] == "validating"

            # And when "a" ends it, it ends, and the lock is free
            assert await batches.finish(client, settings, record, holder="a", files=[], status="completed")
            assert (await batches.get(client, settings, record["id"], tenant="t"))["status"] == "completed"
            assert await batches.lock(client, settings, record["id"], "b")
        finally:
            await client.aclose()

    asyncio.run(story())


def test_a_batch_a_queue_cannot_take_fails_whole_and_one_that_fits_exactly_runs(own_stack: Stack) -> None:
    # Given an API whose queues hold at most 5 messages, and no worker to empty them
    url = start_api(own_stack, BLAZE_QUEUE_MAX="5")
    with openai.OpenAI(api_key=ADMIN_TOKEN, base_url=url + "/v1", timeout=60, max_retries=0) as openai_api:
        # When a batch of 6 echo jobs is made, Then it fails whole, naming the queue
        refused = submit(openai_api, [echo_line(f"big-{i}") for i in range(6)], JOBS)
        assert refused.status == "failed" and refused.errors is not None and refused.errors.data
        assert refused.errors.data[0].code == "queue_full" and "echo" in (refused.errors.data[0].message or "")

        # And a batch of 5 fills the queue exactly, after which one more line is refused
        assert submit(openai_api, [echo_line(f"fits-{i}") for i in range(5)], JOBS).status == "in_progress"
        assert submit(openai_api, [echo_line("one-more")], JOBS).status == "failed"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
            assert len(http.get("/v1/jobs").json()["jobs"]) == 5


def test_a_line_keeps_only_what_its_response_needs_and_an_oversized_line_or_custom_id_fails_itself(
    openai_api: openai.OpenAI, settings: Settings
) -> None:
    # Given a chat line carrying fields no response needs, a custom_id over 512 characters,
    # and a line over the API's body bound
    chat = {"messages": [{"role": "user", "content": unique("hi"), "name": "x" * 1000}], "max_tokens": 1, "user": "u" * 1000}
    lines: list[Any] = [
        line("kept", CHAT, chat),
        line("c" * 513, CHAT, chat),
        line("huge", CHAT, {**chat, "user": "u" * settings.max_body_bytes}),
    ]

    # When they are made a batch
    batch = submit(openai_api, lines, CHAT)

    # Then the good line's job keeps none of the body beside its input
    keys = Keys(settings.redis_prefix)
    with redis.Redis.from_url(settings.redis_url) as client:
        entries = [entry.decode() for entry in client.lrange(keys.batch_jobs(batch.id), 0, -1)]
        assert [entry.partition(":")[2] for entry in entries] == ["kept"]
        assert client.hget(keys.job(entries[0].partition(":")[0]), batches.REQUEST_FIELD) == b"{}"
        # And each bad line is an error line saying which bound it broke
        errors = [json.loads(raw) for raw in client.lrange(keys.batch_errors(batch.id), 0, -1)]
    assert sorted(entry["error"]["code"] for entry in errors) == ["invalid_custom_id", "line_too_large"]
    assert any("custom_id" in entry["error"]["message"] for entry in errors)


def test_a_tenants_files_are_held_to_its_quota_and_a_delete_or_an_expiry_makes_room(own_stack: Stack) -> None:
    # Given an API whose tenants may keep 1000 bytes of files
    url = start_api(own_stack, BLAZE_FILE_QUOTA_BYTES="1000")
    with openai.OpenAI(api_key=ADMIN_TOKEN, base_url=url + "/v1", timeout=60, max_retries=0) as openai_api:
        first = openai_api.files.create(file=("a.jsonl", b"a" * 600), purpose="batch")

        # When a second file would pass it, Then it is refused, naming the file, in OpenAI's shape
        with pytest.raises(openai.APIStatusError) as refused:
            openai_api.files.create(file=("b.jsonl", b"b" * 600), purpose="batch")
        assert refused.value.status_code == 413
        assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "file"
        assert refused.value.body["code"] == "file_quota_exceeded"

        # And once the first is deleted, the second fits
        openai_api.files.delete(first.id)
        second = openai_api.files.create(file=("b.jsonl", b"b" * 600), purpose="batch")

    # And a file past its expiry no longer counts, nor stays in the tenant's index
    env = own_stack.env
    settings = Settings(redis_url=env["BLAZE_REDIS_URL"], redis_prefix=env["BLAZE_REDIS_PREFIX"], file_quota_bytes=1000)
    keys = Keys(settings.redis_prefix)

    async def story() -> None:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            tenant = settings.default_tenant
            sizes = keys.tenant_file_sizes(tenant)
            await client.zadd(sizes, {f"{second.id}:600": time.time() - 1})  # as if it had expired
            made = await files.put(client, settings, tenant=tenant, filename="c", purpose="batch", content=b"c" * 900)
            assert [text(entry) for entry in await client.zrange(sizes, 0, -1)] == [f"{made['id']}:900"]
            assert int(await client.get(keys.tenant_file_bytes(tenant)) or 0) == 900
            assert second.id.encode() not in await client.zrange(keys.tenant_files(tenant), 0, -1)
            assert 0 < await client.ttl(keys.tenant_files(tenant)) <= settings.file_ttl_s
        finally:
            await client.aclose()

    asyncio.run(story())


def test_a_batch_file_is_checked_without_holding_its_parsed_lines_and_read_again_a_part_at_a_time() -> None:
    # Given a file of CRLF lines, a blank one, a malformed one, and bytes past the first decode chunk
    good = json.dumps(echo_line("a")).encode()
    content = good + b"\r\n\r\n  \n{bad\n" + json.dumps(echo_line("b", text="x" * batch_lines.DECODE_CHUNK)).encode()

    # When it is scanned, Then each good line is where it lies, with its engine, and the bad one an error line
    lines, bad = batch_lines.scan(content, endpoint=JOBS, max_requests=3, max_line_bytes=2 * batch_lines.DECODE_CHUNK)
    assert [(line.number, line.custom_id, line.engine) for line in lines] == [(1, "a", "echo"), (5, "b", "echo")]
    assert [entry["error"]["code"] for entry in bad] == ["invalid_json"]
    # And the bodies are read again from the lines' places
    assert [body["input"].get("text", "")[:1] for body in batch_lines.bodies_of(content, lines)] == ["", "x"]

    # And a file not UTF-8 past its first chunk, or past the request bound, fails whole
    with pytest.raises(batch_lines.BatchFileError) as refused:
        batch_lines.scan(content + b"\n\xff", endpoint=JOBS, max_requests=3, max_line_bytes=2 * batch_lines.DECODE_CHUNK)
    assert refused.value.code == "invalid_file" and str(len(content) + 1) in refused.value.message
    with pytest.raises(batch_lines.BatchFileError) as refused:
        batch_lines.scan(content, endpoint=JOBS, max_requests=2, max_line_bytes=2 * batch_lines.DECODE_CHUNK)
    assert refused.value.code == "too_many_requests"


def test_one_batch_is_created_at_a_time_and_a_create_that_waits_too_long_is_told_to_retry(own_stack: Stack) -> None:
    # Given an API whose batch creates wait half a second for another's, and another process
    # holding the deployment's batch-create lock
    url = start_api(own_stack, BLAZE_BATCH_CREATE_WAIT_S="0.5")
    lock = Keys(own_stack.env["BLAZE_REDIS_PREFIX"]).batch_create_lock
    with (
        redis.Redis.from_url(own_stack.env["BLAZE_REDIS_URL"]) as client,
        openai.OpenAI(api_key=ADMIN_TOKEN, base_url=url + "/v1", timeout=60, max_retries=0) as openai_api,
    ):
        client.set(lock, "another-process", px=30_000)
        uploaded = openai_api.files.create(file=("b.jsonl", jsonl([echo_line("one")])), purpose="batch")

        # When a batch is made, Then it is a 503 telling the client when to retry, and no batch
        with pytest.raises(openai.InternalServerError) as refused:
            openai_api.batches.create(input_file_id=uploaded.id, endpoint=JOBS, completion_window="24h")  # type: ignore[arg-type]
        assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "5"
        assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "batch_create_busy"
        assert list(openai_api.batches.list()) == []

        # And once the lock is free, the batch is made and the lock released behind it
        client.delete(lock)
        made = openai_api.batches.create(input_file_id=uploaded.id, endpoint=JOBS, completion_window="24h")  # type: ignore[arg-type]
        assert made.status == "in_progress" and client.get(lock) is None


def test_a_batchs_webhook_hosts_are_checked_once_each(settings: Settings) -> None:
    # Given a deployment that refuses private webhook receivers, and a batch's lines to two hosts
    strict = settings.model_copy(update={"webhook_allow_private": False})
    jobs = [
        TypeAdapter(JobCreate).validate_python({"engine": "echo", "input": {}, "webhook": f"http://{host}/hook"})
        for host in ("localhost", "localhost", "10.0.0.1", "localhost")
    ]

    # When their webhook fields are made for the batch
    async def story() -> tuple[list[str], int]:
        hosts = openai_batches.WebhookHosts(strict)
        refusals = []
        for job in jobs:
            with pytest.raises(InputProblem) as refused:
                await hosts.fields(job)
            refusals.append(refused.value.field + ": " + refused.value.message)
        return refusals, len(hosts.verdicts)

    refusals, checked = asyncio.run(story())

    # Then each line is refused naming webhook, the same way for the same host, each host checked once
    assert all(refusal.startswith("webhook: ") for refusal in refusals)
    assert refusals[0] == refusals[1] == refusals[3] != refusals[2]
    assert checked == 2


def test_a_finalize_lock_is_renewed_while_held_and_let_go_when_its_holder_fails(settings: Settings) -> None:
    # Given a batch's finalization taken by "a", held past its lifetime
    async def story() -> None:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        key = Keys(settings.redis_prefix).batch_lock(batches.new_batch_id())
        try:
            await client.set(key, "a", px=1000)
            with pytest.raises(RuntimeError):
                async with batches.renewed(client, key, "a", ttl_s=1.0):
                    await asyncio.sleep(1.5)
                    # Then it is still "a"'s, renewed
                    assert await client.get(key) == b"a"
                    # When writing the files fails
                    raise RuntimeError("rendering failed")
            # Then the lock is free at once for another process
            assert await client.get(key) is None

            # And a lock that changed hands is not let go by the one that lost it
            await client.set(key, "b", px=5000)
            async with batches.renewed(client, key, "a", ttl_s=1.0):
                pass
            assert await client.get(key) == b"b"
        finally:
            await client.delete(key)
            await client.aclose()

    asyncio.run(story())


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
