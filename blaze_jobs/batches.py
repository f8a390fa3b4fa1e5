"""Batches: a file of requests, each made one job, followed to their end and answered as an
output file and an error file, as OpenAI's Batch API describes them.

A batch is a hash (``keys.Keys.batch``) of flat string fields, the ids of its jobs in line
order (``keys.Keys.batch_jobs``) and the error-file lines of the input lines that made no job
(``keys.Keys.batch_errors``). Its life:

``validating`` (stored, its lines being read) -> ``in_progress`` (its jobs created, all at
once) or ``failed`` (a whole-file problem: ``errors``) -> ``finalizing`` (every job ended:
the output and error files are being written, by one API process at a time) ->
``completed``. A cancel makes it ``cancelling`` (its queued and running jobs canceled), then
``cancelled`` with the files of what ended; past its completion window it is ``expired``
the same way. Counts come from its jobs' statuses, read pipelined.

Here are the record and the Redis steps; the input file's lines and the output's are
``batch_lines.py``; turning a line's body into a job and an ended job into its response body
is the API's (``api/openai_batches.py``), which advances a batch on reads and in a loop of its
own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from enum import Enum
from typing import Any, cast

import redis.asyncio

from blaze_jobs import scripts
from blaze_jobs.files import queue_put
from blaze_jobs.jobs import JobStatus
from blaze_jobs.keys import Keys
from blaze_jobs.records import decode, score_of, text
from blaze_jobs.settings import Settings

#: What a batch id looks like (OpenAI's own start ``batch_``).
ID_PREFIX = "batch_"
#: The one completion window OpenAI offers, and this deployment with it.
WINDOW = "24h"
WINDOW_S = 86_400
log = logging.getLogger("blaze_jobs.batches")

#: How long one API process may hold a batch's finalization before another takes it over
#: (renewed every third of it while the process renders the batch's files).
LOCK_S = 60
#: How long the deployment's batch-create lock outlives its holder's last renewal (it is
#: renewed every third of it): a process that died creating frees it within this.
CREATE_LOCK_S = 30
#: How often a create waiting for the batch-create lock tries it again.
CREATE_POLL_S = 0.05
#: Job fields a batch line's job carries (``extra`` of the create): which batch, which line.
BATCH_FIELD, CUSTOM_ID_FIELD, REQUEST_FIELD = "batch", "custom_id", "batch_request"
#: Job statuses read per round trip while counting a batch's jobs: at first, and at most.
FIRST_LOOK, READ_CHUNK = 50, 2_000


class BatchStatus(str, Enum):
    validating = "validating"
    failed = "failed"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (BatchStatus.failed, BatchStatus.completed, BatchStatus.expired, BatchStatus.cancelled)


class BatchNotFound(Exception):
    """No batch of the caller's tenant with this id."""


class CreateBusy(Exception):
    """Another batch's jobs were being created for longer than a create waits."""


def holder_id() -> str:
    """Who holds a lock: this process, and one call of it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def new_batch_id() -> str:
    return ID_PREFIX + uuid.uuid4().hex[:24]


# --- the record -----------------------------------------------------------------------------


def new_record(
    *, batch_id: str, tenant: str, endpoint: str, input_file_id: str, metadata: dict[str, str] | None, base_url: str
) -> dict[str, str]:
    """The fields of a batch just accepted, ``validating``. ``base_url`` is where its creator
    reached the API: its output's URLs start with it, whoever writes the output."""
    now = time.time()
    return {
        "id": batch_id,
        "tenant": tenant,
        "endpoint": endpoint,
        "input_file_id": input_file_id,
        "completion_window": WINDOW,
        "status": BatchStatus.validating.value,
        "created_at": repr(now),
        "expires_at": repr(now + WINDOW_S),
        "metadata": json.dumps(metadata) if metadata is not None else "",
        "base_url": base_url,
        "total": "0",
        "completed": "0",
        "failed": "0",
    }


def batch_view(record: dict[str, str]) -> dict[str, Any]:
    """The batch as OpenAI's ``Batch`` describes it."""

    def moment(name: str) -> int | None:
        value = record.get(name)
        return int(float(value)) if value else None

    errors = json.loads(record["errors"]) if record.get("errors") else None
    return {
        "id": record["id"],
        "object": "batch",
        "endpoint": record["endpoint"],
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": record["status"],
        "output_file_id": record.get("output_file_id") or None,
        "error_file_id": record.get("error_file_id") or None,
        "errors": {"object": "list", "data": errors} if errors else None,
        "created_at": moment("created_at"),
        "in_progress_at": moment("in_progress_at"),
        "expires_at": moment("expires_at"),
        "finalizing_at": moment("finalizing_at"),
        "completed_at": moment("completed_at"),
        "failed_at": moment("failed_at"),
        "expired_at": moment("expired_at"),
        "cancelling_at": moment("cancelling_at"),
        "cancelled_at": moment("cancelled_at"),
        "request_counts": {"total": int(record["total"]), "completed": int(record["completed"]), "failed": int(record["failed"])},
        "metadata": json.loads(record["metadata"]) if record.get("metadata") else None,
    }


def ttl_s(settings: Settings) -> int:
    """How long a batch is kept: its window, then as long as the files it wrote."""
    return WINDOW_S + settings.file_ttl_s


# --- Redis ----------------------------------------------------------------------------------


async def store_new(client: redis.asyncio.Redis, settings: Settings, record: dict[str, str]) -> None:
    """Store a batch just accepted (``validating``) and index it for its tenant's list."""
    keys = Keys(settings.redis_prefix)
    async with client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.batch(record["id"]), mapping=cast(dict[Any, Any], record))
        pipe.expire(keys.batch(record["id"]), ttl_s(settings))
        index = keys.tenant_batches(record["tenant"])
        # The index lives as long as its newest batch, its entries of expired ones dropped here.
        pipe.zremrangebyscore(index, "-inf", f"({score_of(time.time() - ttl_s(settings))}")
        pipe.zadd(index, {record["id"]: score_of(float(record["created_at"]))})
        pipe.expire(index, ttl_s(settings))
        await pipe.execute()


async def get(client: redis.asyncio.Redis, settings: Settings, batch_id: str, *, tenant: str) -> dict[str, str]:
    """``tenant``'s batch; BatchNotFound for a missing one or another tenant's."""
    record = decode(await client.hgetall(Keys(settings.redis_prefix).batch(batch_id)))
    if not record or record.get("tenant") != tenant:
        raise BatchNotFound(batch_id)
    return record


async def update(client: redis.asyncio.Redis, settings: Settings, record: dict[str, str], **fields: str) -> dict[str, str]:
    """Write ``fields`` of the batch; the record with them."""
    await client.hset(Keys(settings.redis_prefix).batch(record["id"]), mapping=cast(dict[Any, Any], fields))
    return {**record, **fields}


async def update_if(
    client: redis.asyncio.Redis, settings: Settings, record: dict[str, str], *, expect: tuple[BatchStatus, ...], **fields: str
) -> dict[str, str] | None:
    """Write ``fields`` of the batch only while its status is one of ``expect`` (a cancel, an
    expiry and a finalization race each other across API processes); the record as it is
    now with them, or None when its status is another."""
    key = Keys(settings.redis_prefix).batch(record["id"])
    async with client.pipeline(transaction=True) as pipe:
        while True:
            await pipe.watch(key)
            now = {text(name): text(value) for name, value in (await pipe.hgetall(key)).items()}
            if now.get("status") not in {status.value for status in expect}:
                await pipe.reset()
                return None
            pipe.multi()
            pipe.hset(key, mapping=cast(dict[Any, Any], fields))
            try:
                await pipe.execute()
            except redis.exceptions.WatchError:
                continue  # changed meanwhile: look again
            return {**now, **fields}


async def start(
    client: redis.asyncio.Redis,
    settings: Settings,
    record: dict[str, str],
    *,
    job_ids: list[str],
    error_lines: list[dict[str, Any]],
) -> dict[str, str]:
    """The batch ``in_progress`` once its jobs are stored: their ids, its malformed lines'
    error-file lines, its counts, and its place among the open batches, in one step."""
    keys = Keys(settings.redis_prefix)
    batch_id, ttl = record["id"], ttl_s(settings)
    now = repr(time.time())
    fields = {
        "status": BatchStatus.in_progress.value,
        "in_progress_at": now,
        "total": str(len(job_ids) + len(error_lines)),
        "failed": str(len(error_lines)),
        "malformed": str(len(error_lines)),
        "jobs": str(len(job_ids)),
    }
    async with client.pipeline(transaction=True) as pipe:
        for start_at in range(0, len(job_ids), 10_000):  # RPUSH in parts: one command stays small
            pipe.rpush(keys.batch_jobs(batch_id), *job_ids[start_at : start_at + 10_000])
        if error_lines:
            pipe.rpush(keys.batch_errors(batch_id), *(json.dumps(line, separators=(",", ":")) for line in error_lines))
        pipe.expire(keys.batch_jobs(batch_id), ttl)
        pipe.expire(keys.batch_errors(batch_id), ttl)
        pipe.hset(keys.batch(batch_id), mapping=cast(dict[Any, Any], fields))
        pipe.zadd(keys.batches_open, {batch_id: float(record["expires_at"])})
        await pipe.execute()
    return {**record, **fields}


async def job_ids(client: redis.asyncio.Redis, settings: Settings, batch_id: str) -> list[str]:
    return [text(job_id) for job_id in await client.lrange(Keys(settings.redis_prefix).batch_jobs(batch_id), 0, -1)]


async def statuses(client: redis.asyncio.Redis, settings: Settings, ids: list[str]) -> list[str | None]:
    """Each job's status (None for a job whose retention ran out), pipelined."""
    keys = Keys(settings.redis_prefix)
    found: list[str | None] = []
    for start_at in range(0, len(ids), READ_CHUNK):
        async with client.pipeline(transaction=False) as pipe:
            for job_id in ids[start_at : start_at + READ_CHUNK]:
                pipe.hget(keys.job(job_id), "status")
            found += [text(value) if value is not None else None for value in await pipe.execute()]
    return found


async def look(client: redis.asyncio.Redis, settings: Settings, record: dict[str, str]) -> tuple[dict[str, str], bool]:
    """The batch's counts as its jobs stand, and whether every job has ended.

    Jobs mostly end in the order they were queued, so the batch keeps how many of its first
    jobs have all ended (``checked``) and their counts, and a look reads on from there, a part
    at a time, only as far as the first part with a job not ended: a look costs a part's
    statuses, not the whole batch's, however large it is. A request that failed (its job
    failed, was canceled or is gone) counts as failed, as does each malformed line; jobs
    ended past the first one still running are counted too, and checked again later."""
    keys = Keys(settings.redis_prefix)
    jobs_made = int(record.get("jobs") or 0)
    checked = int(record.get("checked") or 0)
    completed, failed = int(record.get("checked_completed") or 0), int(record.get("checked_failed") or 0)
    ahead = {"completed": 0, "failed": 0}
    # A look reads a few statuses first: most looks find the first job still queued or running.
    window = FIRST_LOOK
    while checked < jobs_made:
        entries = await client.lrange(keys.batch_jobs(record["id"]), checked, checked + window - 1)
        window = min(window * 4, READ_CHUNK)
        if not entries:
            break
        found = await statuses(client, settings, [text(entry).partition(":")[0] for entry in entries])
        ended = 0
        for status in found:
            if status is not None and not JobStatus(status).ended:
                break
            ended += 1
            if status == JobStatus.succeeded.value:
                completed += 1
            else:
                failed += 1
        checked += ended
        if ended < len(found):
            for status in found[ended:]:
                if status is None or JobStatus(status).ended:
                    ahead["completed" if status == JobStatus.succeeded.value else "failed"] += 1
            break
    malformed = int(record.get("malformed") or 0)
    fields = {
        "checked": str(checked),
        "checked_completed": str(completed),
        "checked_failed": str(failed),
        "completed": str(completed + ahead["completed"]),
        "failed": str(failed + ahead["failed"] + malformed),
    }
    return fields, checked >= jobs_made


async def unchecked(client: redis.asyncio.Redis, settings: Settings, record: dict[str, str]) -> list[str]:
    """The ids of the batch's jobs from the first one not known to have ended (to cancel)."""
    entries = await client.lrange(Keys(settings.redis_prefix).batch_jobs(record["id"]), int(record.get("checked") or 0), -1)
    return [text(entry).partition(":")[0] for entry in entries]


async def jobs(client: redis.asyncio.Redis, settings: Settings, ids: list[str]) -> list[dict[str, str]]:
    """The records of the batch's jobs (empty for a job whose retention ran out), pipelined."""
    keys = Keys(settings.redis_prefix)
    found: list[dict[str, str]] = []
    for start_at in range(0, len(ids), READ_CHUNK):
        async with client.pipeline(transaction=False) as pipe:
            for job_id in ids[start_at : start_at + READ_CHUNK]:
                pipe.hgetall(keys.job(job_id))
            found += [decode(raw) for raw in await pipe.execute()]
    return found


async def malformed_lines(client: redis.asyncio.Redis, settings: Settings, batch_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in await client.lrange(Keys(settings.redis_prefix).batch_errors(batch_id), 0, -1)]


async def lock(client: redis.asyncio.Redis, settings: Settings, batch_id: str, holder: str) -> bool:
    """Take the batch's finalization for ``holder``, unless another API process holds it."""
    return bool(await client.set(Keys(settings.redis_prefix).batch_lock(batch_id), holder, nx=True, ex=LOCK_S))


async def finish(
    client: redis.asyncio.Redis, settings: Settings, record: dict[str, str], *, holder: str, files: list[Any], **fields: str
) -> bool:
    """The batch's last step, only while ``holder`` still holds its finalization: store the
    ``files`` it wrote (``files.queue_put`` calls, as ``(keyword arguments)``), write
    ``fields`` (its final status), drop it from the open batches and release the lock. False,
    and nothing written, when the lock changed hands meanwhile."""
    keys = Keys(settings.redis_prefix)
    lock_key = keys.batch_lock(record["id"])

    def write(pipe: Any) -> None:
        for file in files:
            queue_put(pipe, keys, ttl_s=settings.file_ttl_s, index_ttl_s=settings.file_ttl_s, **file)
        pipe.hset(keys.batch(record["id"]), mapping=cast(dict[Any, Any], fields))
        pipe.zrem(keys.batches_open, record["id"])
        pipe.delete(lock_key)

    return await while_held(client, lock_key, holder, write)


async def open_batches(client: redis.asyncio.Redis, settings: Settings, *, start: int, count: int) -> list[str]:
    """Up to ``count`` batches not ended yet from the ``start``-th, soonest to expire first."""
    found = await client.zrange(Keys(settings.redis_prefix).batches_open, start, start + count - 1)
    return [text(member) for member in found]


async def tenant_of(client: redis.asyncio.Redis, settings: Settings, batch_id: str) -> str | None:
    value = await client.hget(Keys(settings.redis_prefix).batch(batch_id), "tenant")
    return text(value) if value is not None else None


async def forget_open(client: redis.asyncio.Redis, settings: Settings, batch_id: str) -> None:
    """Drop a batch whose record is gone from the open batches."""
    await client.zrem(Keys(settings.redis_prefix).batches_open, batch_id)


# --- locks ----------------------------------------------------------------------------------


async def renew(client: redis.asyncio.Redis, key: str, holder: str, *, ttl_s: float) -> bool:
    """Extend the lock ``key`` by ``ttl_s`` while ``holder`` holds it (compare-and-expire)."""
    return await while_held(client, key, holder, lambda pipe: pipe.pexpire(key, int(ttl_s * 1000)))


async def while_held(client: redis.asyncio.Redis, key: str, holder: str, write: Callable[[Any], Any]) -> bool:
    """Send the commands ``write`` queues on a transaction only while ``holder`` holds the
    lock ``key``; False, and nothing written, when it does not (or the lock changes hands
    before they are sent)."""
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(key)
        if text(await pipe.get(key) or b"") != holder:
            await pipe.reset()
            return False
        pipe.multi()
        write(pipe)
        try:
            await pipe.execute()
        except redis.exceptions.WatchError:
            return False
    return True


async def release(client: redis.asyncio.Redis, key: str, holder: str) -> bool:
    """Drop the lock ``key`` only while ``holder`` holds it (compare-and-delete)."""
    return bool(await scripts.script(client, "release")(keys=[key], args=[holder]))


@contextlib.asynccontextmanager
async def renewed(client: redis.asyncio.Redis, key: str, holder: str, *, ttl_s: float) -> AsyncIterator[None]:
    """While the block runs, ``holder``'s lock ``key`` is renewed every third of ``ttl_s``;
    after it, released, however the block ended."""

    async def keep() -> None:
        while True:
            await asyncio.sleep(ttl_s / 3)
            try:
                if not await renew(client, key, holder, ttl_s=ttl_s):
                    log.warning("lock %s is no longer %s's", key, holder)
                    return
            except redis.exceptions.RedisError as error:
                log.warning("lock %s not renewed: %s", key, error)

    keeping = asyncio.create_task(keep())
    try:
        yield
    finally:
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping
        try:
            await asyncio.shield(release(client, key, holder))
        except redis.exceptions.RedisError as error:  # it runs out by itself
            log.warning("lock %s not released: %s", key, error)


@contextlib.asynccontextmanager
async def creating(client: redis.asyncio.Redis, settings: Settings, *, wait_s: float) -> AsyncIterator[None]:
    """Hold the deployment's batch-create lock while the block runs: one batch is admitted
    (quota, queue bounds) and stored at a time, so two cannot both pass a bound the first
    part of each checks. Waits for it up to ``wait_s``; CreateBusy past that."""
    key, holder = Keys(settings.redis_prefix).batch_create_lock, holder_id()
    deadline = time.monotonic() + wait_s
    while not await client.set(key, holder, nx=True, px=CREATE_LOCK_S * 1000):
        if time.monotonic() >= deadline:
            raise CreateBusy(f"another batch was being created for over {wait_s:g} s")
        await asyncio.sleep(CREATE_POLL_S)
    async with renewed(client, key, holder, ttl_s=CREATE_LOCK_S):
        yield
