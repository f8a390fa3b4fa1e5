"""Bounds of the Batch and Files API that hold under hostile or heavy use: one batch created
at a time, a tenant's file quota, line and custom_id bounds, batch files checked off the event
loop, webhook hosts checked once per batch, and the locks that let one API process end a batch."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest
import redis
import redis.asyncio
from pydantic import TypeAdapter

from api import batch_creation
from api.problems import InputProblem
from blaze_jobs import batch_lines, batches, files
from blaze_jobs.jobs import JobCreate
from blaze_jobs.keys import Keys
from blaze_jobs.records import text
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from tests.conftest import ADMIN_TOKEN, start_api, unique
from tests.test_batches import CHAT, JOBS, echo_line, jsonl, line, submit

pytestmark = pytest.mark.timeout(150)


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
        hosts = batch_creation.WebhookHosts(strict)
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
