"""OpenAI's Batch API: ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches``
and ``POST /v1/batches/{id}/cancel``, over the one create path.

Each good line of the input file is one Blaze job (its record names the batch and the line's
``custom_id``), on its engine's queue like any other: batched on the device, cached, retried,
seen in Flower. A batch's jobs are made in one step: every line read and checked here, cache
hits born succeeded, and the rest stored and queued by one call of the create script
(``AsyncJobStore.create_many``), which admits them together, so a batch the tenant's quota or
a queue's bound cannot take fails whole, with nothing created. A malformed line fails only
itself, in the error file.

Beside OpenAI's endpoints (``/v1/images/generations``, ``/v1/chat/completions``,
``/v1/completions``), a batch may name ``/v1/jobs``, Blaze's own: each line's body is a
``POST /v1/jobs`` body (any engine) and its response body the job as ``GET /v1/jobs/{id}``
shows it.

A batch advances (its counts, then, once every job has ended, its output and error files and
its final status) when it is read, and in a loop every API process runs (``SWEEP_S``), so it
completes though nobody reads it; a lock lets one process at a time write its files.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from blaze_jobs import batches, files
from blaze_jobs.batch_lines import BatchFileError
from blaze_jobs.batches import BatchNotFound, BatchStatus
from blaze_jobs.files import FileNotFound
from blaze_jobs.keys import Keys
from blaze_jobs.records import score_of
from blaze_jobs.settings import Settings
from blaze_jobs.store import AsyncJobStore

from . import openai_retries
from .auth import Caller
from .batch_creation import JOBS, create_jobs
from .batch_progress import advance, sweep
from .openai_bodies import CHAT, COMPLETIONS, IMAGES
from .openai_errors import OpenAIError, OpenAIRoute, invalid
from .openai_files import list_page
from .openai_routes import ERRORS
from .request_context import base_url, settings_of
from .responses import JSONResponse

ENDPOINTS = (CHAT, COMPLETIONS, IMAGES, JOBS)
#: The Retry-After of a create that waited too long for another batch's: a few seconds.
CREATE_RETRY_S = 5


class BatchCreate(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64, description="A file uploaded with purpose `batch`: JSONL of request lines.")
    endpoint: Literal[ENDPOINTS] = Field(  # type: ignore[valid-type]
        description="The endpoint of every line (`/v1/jobs`: Blaze's own, a `POST /v1/jobs` body per line)."
    )
    completion_window: Literal["24h"] = Field(description="Past it, the batch expires and its unfinished jobs are canceled.")
    metadata: dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]] | None = (
        Field(None, max_length=16, description="Up to 16 pairs, keys up to 64 characters, values up to 512.")
    )
    output_expires_after: dict[str, Any] | None = Field(None, description="Accepted; output files are kept BLAZE_FILE_TTL_S.")


def not_found(batch_id: str) -> OpenAIError:
    return OpenAIError(404, f"No batch found with id '{batch_id}'", param="batch_id", code="batch_not_found")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Advance the open batches in the background while the app serves."""
    task = asyncio.create_task(sweep(app), name="blaze-batch-sweep")
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


router = APIRouter(route_class=OpenAIRoute, tags=["OpenAI batches"], lifespan=lifespan)


#: The error code of a batch whose create failed on a fault of its own (Redis went away): a
#: retry of that create makes the batch anew.
INTERNAL = "internal"


@router.post("/v1/batches", responses=ERRORS)
async def create_batch(request: Request, caller: Caller, body: BatchCreate) -> JSONResponse:
    """Make a batch from an uploaded file: each good line becomes a job at once; the answer is
    the batch `in_progress` (or `failed`, with `errors`, when the file cannot be a batch)."""
    settings = settings_of(request.app)
    client = request.app.state.store.redis
    # The client retries a create whose answer it lost: the retry answers the batch it made.
    asked = body.model_dump(exclude_none=True)
    earlier = await openai_retries.earlier_job(request, caller, "/v1/batches", asked)
    if earlier is not None:
        try:
            made = await batches.get(client, settings, earlier, tenant=caller.tenant)
        except BatchNotFound:
            made = None
        # A batch that could not be created (its create answered 500) is what the retry is for.
        if made is not None and not _create_failed(made):
            return JSONResponse(batches.batch_view(made))
    missing = OpenAIError(404, f"No such File object: {body.input_file_id}", param="input_file_id", code="file_not_found")
    try:
        meta = await files.describe(client, settings, body.input_file_id, tenant=caller.tenant)
    except FileNotFound:
        raise missing from None
    if meta["purpose"] != "batch":
        raise invalid("input_file_id", f"file {body.input_file_id} was uploaded with purpose {meta['purpose']!r}, not 'batch'")
    record = batches.new_record(
        batch_id=batches.new_batch_id(),
        tenant=caller.tenant,
        endpoint=body.endpoint,
        input_file_id=body.input_file_id,
        metadata=body.metadata,
        base_url=base_url(request),
    )
    try:
        # One batch is admitted and stored at a time, deployment-wide: a second waits.
        async with batches.creating(client, settings, wait_s=settings.batch_create_wait_s):
            try:  # read once the lock is held: creates waiting for it do not each hold a file
                content = await files.content(client, settings, body.input_file_id, tenant=caller.tenant)
            except FileNotFound:
                raise missing from None
            await batches.store_new(client, settings, record)
            await openai_retries.remember(request, caller, "/v1/batches", asked, record["id"])
            try:
                job_entries, error_lines = await create_jobs(request, caller, record, content)
            except BatchFileError as error:
                record = await fail(client, settings, record, [error.entry()])
                return JSONResponse(batches.batch_view(record))
            except Exception:
                # Nothing was admitted (or Redis went away): the batch says so rather than stay validating.
                await fail(client, settings, record, [{"code": INTERNAL, "message": "the batch could not be created; retry"}])
                raise
    except batches.CreateBusy as busy:
        raise OpenAIError(
            503, f"{busy}; retry", param=None, code="batch_create_busy", headers={"Retry-After": str(CREATE_RETRY_S)}
        ) from None
    try:
        record = await batches.start(client, settings, record, job_ids=job_entries, error_lines=error_lines)
    except Exception:
        # Its job list could not be written: its jobs are canceled, not left to run in no batch.
        ids = [entry.partition(":")[0] for entry in job_entries]
        await request.app.state.store.cancel_many(ids, tenant=caller.tenant, reason=f"batch {record['id']} could not start")
        await fail(client, settings, record, [{"code": INTERNAL, "message": "the batch could not be created; retry"}])
        raise
    return JSONResponse(batches.batch_view(record))


def _create_failed(record: dict[str, str]) -> bool:
    """The batch failed for a fault of the create itself, not of its file."""
    errors = json.loads(record.get("errors") or "[]")
    return record.get("status") == BatchStatus.failed.value and any(error.get("code") == INTERNAL for error in errors)


async def fail(client: Any, settings: Settings, record: dict[str, str], errors: list[dict[str, Any]]) -> dict[str, str]:
    return await batches.update(
        client, settings, record, status=BatchStatus.failed.value, failed_at=repr(time.time()), errors=json.dumps(errors)
    )


@router.get("/v1/batches/{batch_id}", responses=ERRORS)
async def get_batch(request: Request, caller: Caller, batch_id: str) -> JSONResponse:
    """The batch, with its counts as its jobs stand now."""
    settings = settings_of(request.app)
    try:
        record = await batches.get(request.app.state.store.redis, settings, batch_id, tenant=caller.tenant)
    except BatchNotFound:
        raise not_found(batch_id) from None
    return JSONResponse(batches.batch_view(await advance(request.app, record)))


@router.get("/v1/batches", responses=ERRORS)
async def list_batches(
    request: Request,
    caller: Caller,
    after: Annotated[str | None, Query(max_length=64, description="The id of the last batch of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
) -> JSONResponse:
    """The tenant's batches, newest first, a page at a time."""
    settings = settings_of(request.app)
    client = request.app.state.store.redis
    keys = Keys(settings.redis_prefix)
    index = keys.tenant_batches(caller.tenant)
    await client.zremrangebyscore(index, "-inf", f"({score_of(time.time() - batches.ttl_s(settings))}")
    found, more = await files.index_page(client, index, keys.batch, after=after, limit=limit, order="desc")
    data = [batches.batch_view(record) for record in found]
    return list_page(data, more)


@router.post("/v1/batches/{batch_id}/cancel", responses=ERRORS)
async def cancel_batch(request: Request, caller: Caller, batch_id: str) -> JSONResponse:
    """Cancel the batch: its queued jobs never run, its running ones stop at their next step.
    It is `cancelling` until then, and `cancelled` with the files of what ended."""
    settings = settings_of(request.app)
    store: AsyncJobStore = request.app.state.store
    try:
        record = await batches.get(store.redis, settings, batch_id, tenant=caller.tenant)
    except BatchNotFound:
        raise not_found(batch_id) from None
    # Only from in_progress, checked in the same step as the write: a batch another process
    # has begun to finalize (or expire) meanwhile is not reopened.
    cancelling = await batches.update_if(
        store.redis,
        settings,
        record,
        expect=(BatchStatus.in_progress,),
        status=BatchStatus.cancelling.value,
        cancelling_at=repr(time.time()),
        ending=BatchStatus.cancelled.value,
    )
    if cancelling is None:
        status = (await batches.get(store.redis, settings, batch_id, tenant=caller.tenant))["status"]
        # 400, not 409: the client retries a 409, and this answer does not change.
        raise invalid(None, f"Cannot cancel a batch with status {status!r}", code="batch_not_cancellable")
    record = cancelling
    ids = await batches.unchecked(store.redis, settings, record)
    await store.cancel_many(ids, tenant=caller.tenant, reason=f"batch {batch_id} canceled by request")
    return JSONResponse(batches.batch_view(record))
