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
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import redis.exceptions
from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from blaze_jobs import batch_lines, batches, files
from blaze_jobs.artifacts import url_signer
from blaze_jobs.batch_lines import BatchFileError
from blaze_jobs.batches import BATCH_FIELD, CUSTOM_ID_FIELD, REQUEST_FIELD, BatchNotFound, BatchStatus
from blaze_jobs.broker import queue_key, task_message
from blaze_jobs.errors import QueueFull, QuotaExceeded
from blaze_jobs.files import FileNotFound
from blaze_jobs.jobs import JobCreate, JobStatus, job_view
from blaze_jobs.keys import Keys
from blaze_jobs.settings import ENGINES, Settings
from blaze_jobs.store import AsyncJobStore, score_of

from . import creation, openai_retries, webhooks
from .auth import Caller
from .openai_bodies import CHAT, COMPLETIONS, ENGINE_OF, IMAGES, job_failure, job_for, response_for
from .openai_errors import OpenAIError, OpenAIRoute, invalid
from .openai_files import list_page
from .openai_routes import ERRORS
from .problems import InputProblem, field_name
from .request_context import base_url, settings_of
from .responses import JSONResponse

log = logging.getLogger("blaze_jobs.api.openai_batches")

#: Blaze's own batch endpoint: each line a ``POST /v1/jobs`` body.
JOBS = "/v1/jobs"
ENDPOINTS = (CHAT, COMPLETIONS, IMAGES, JOBS)
#: How often each API process advances the open batches: a batch nobody reads completes
#: within this of its last job's end.
SWEEP_S = 2.0
#: Open batches one sweep advances, soonest to expire first (the next sweep takes the next ones).
SWEEP_BATCHES = 100
#: Lines made into jobs and stored per call of the create script: a part holds Redis for a
#: few milliseconds (a whole 50,000-line file in one call would hold it for a second), and
#: the next part is read while Redis stores this one.
PART = 1000
#: Lines read between two turns of the event loop while a part is being stored.
YIELD_EVERY = 100
_JOB = TypeAdapter(JobCreate)
#: Batch files this process checks at once: each takes a core (and its file's size in
#: memory) while it is read, and the event loop stays free for everything else.
PARSING = asyncio.Semaphore(2)
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


# --- creating a batch -----------------------------------------------------------------------


def line_job(endpoint: str, body: dict[str, Any], settings: Settings) -> Any:
    """The ``JobCreate`` a line's body is; OpenAIError or InputProblem naming the field."""
    if endpoint == JOBS:
        try:
            return _JOB.validate_python(body)
        except ValidationError as error:
            first = error.errors()[0]
            raise InputProblem(field_name(first.get("loc", ())), first.get("msg", "invalid")) from None
    return job_for(endpoint, body, settings)


#: The fields of a line's body its response is rendered from (``response_for`` reads only
#: these): the rest of the body (prompts, messages, ``user``) is in the job's input already.
RENDERING_FIELDS = ("response_format",)


def rendering_fields(body: dict[str, Any]) -> dict[str, Any]:
    """What of a line's body its job keeps for its response (a bounded string, not the body)."""
    return {name: body[name] for name in RENDERING_FIELDS if isinstance(body.get(name), str) and len(body[name]) <= 64}


class WebhookHosts:
    """A batch's lines' webhook fields (``webhooks.webhook_fields``), each distinct host and
    port resolved and checked once per batch: 50,000 lines to one receiver cost one lookup."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # For a host already found public: the fields without a second lookup.
        self.checked = settings.model_copy(update={"webhook_allow_private": True})
        self.verdicts: dict[tuple[str, int], str | None] = {}  # (host, port): why refused, or None

    async def fields(self, job: Any) -> dict[str, str]:
        """The job record's webhook fields; InputProblem naming ``webhook`` as for a single create."""
        if self.settings.webhook_allow_private:
            return await webhooks.webhook_fields(job, self.settings)
        where = (job.webhook.host or "", job.webhook.port or 443)
        if where not in self.verdicts:
            try:
                found = await webhooks.webhook_fields(job, self.settings)
            except InputProblem as problem:
                self.verdicts[where] = problem.message
                raise
            self.verdicts[where] = None
            return found
        refused = self.verdicts[where]
        if refused is not None:
            raise InputProblem("webhook", refused)
        return await webhooks.webhook_fields(job, self.checked)


def engine_of(endpoint: str, line: batch_lines.Line) -> str | None:
    """The engine a line's job will run on, read before the line is (None: it names none)."""
    if endpoint != JOBS:
        return ENGINE_OF[endpoint]
    return line.engine if line.engine in ENGINES else None


async def create_jobs(
    request: Request, caller: Any, record: dict[str, str], content: bytes
) -> tuple[list[str], list[dict[str, Any]]]:
    """Make the batch's jobs from its input file: the entries of its job list (``<job
    id>:<custom_id>``, in line order) and the error-file lines of its malformed lines.
    BatchFileError when the file, or the tenant's quota or a queue's bound, cannot take it;
    then no job is made."""
    settings = settings_of(request.app)
    store: AsyncJobStore = request.app.state.store
    endpoint, tenant = record["endpoint"], caller.tenant
    # 1. The lines, checked off the event loop (a few batches at a time: a large file takes
    #    a core for a while); a malformed one fails itself. Bodies are parsed again a part at
    #    a time, so the parsed file is never held whole.
    async with PARSING:
        good, bad = await asyncio.to_thread(
            batch_lines.scan,
            content,
            endpoint=endpoint,
            max_requests=settings.batch_max_requests,
            max_line_bytes=settings.max_body_bytes,
        )
    # 2. The batch is admitted whole, by the first part stored: each request line counts
    #    against the tenant's quota and its engine's queue bound.
    queues = {engine: queue_key(settings, engine) for engine in ENGINES}
    admit = Counter((engine, queues[engine]) for engine in (engine_of(endpoint, line) for line in good) if engine)
    sent: list[str] = []  # the ids of the jobs handed to Redis: stored, unless the batch was refused
    try:
        return await _create_parts(request, caller, record, content, good, bad, admit=admit, queues=queues, sent=sent)
    except BatchFileError:
        raise  # refused by the first part: nothing was stored
    except BaseException:
        # A later part failed (Redis went away, the request was dropped): the parts stored
        # before would run on, in no batch's job list. They are canceled (the first part's
        # refusal stored nothing: canceling its ids is a no-op).
        if sent:
            try:
                await asyncio.shield(store.cancel_many(sent, tenant=tenant, reason=f"batch {record['id']} could not be created"))
            except Exception:
                log.exception("batch %s: could not cancel the %d jobs of its failed create", record["id"], len(sent))
        raise


async def _create_parts(
    request: Request,
    caller: Any,
    record: dict[str, str],
    content: bytes,
    good: list[batch_lines.Line],
    bad: list[dict[str, Any]],
    *,
    admit: Counter[tuple[str, str]],
    queues: dict[str, str],
    sent: list[str],
) -> tuple[list[str], list[dict[str, Any]]]:
    """``create_jobs``' steps 3 to 5: the jobs made and stored a part at a time, the ids of
    those handed to Redis added to ``sent`` as they go."""
    settings = settings_of(request.app)
    store: AsyncJobStore = request.app.state.store
    endpoint, tenant = record["endpoint"], caller.tenant
    entries: list[str] = []
    born: list[tuple[dict[str, str], Any]] = []
    hosts = WebhookHosts(settings)
    storing: asyncio.Task[None] | None = None
    try:
        for start_at in range(0, len(good), PART):
            # 3. A part of the lines, each read into the job it asks for, while Redis stores the part before.
            made: list[tuple[str, Any, dict[str, str], dict[str, Any]]] = []
            part = good[start_at : start_at + PART]
            bodies = await asyncio.to_thread(batch_lines.bodies_of, content, part)
            for index, (line, body, job_id) in enumerate(zip(part, bodies, creation.new_job_ids(len(part)), strict=True)):
                number, custom_id = line.number, line.custom_id
                if index % YIELD_EVERY == 0:
                    # The event loop writes the part in flight on to Redis, and reads its answer.
                    await asyncio.sleep(0)
                try:
                    job = line_job(endpoint, body, settings)
                    job_record, job_input = creation.job_record(job, tenant=tenant, settings=settings, job_id=job_id)
                    if job.webhook is not None:
                        job_record.update(await hosts.fields(job))
                except OpenAIError as error:
                    bad.append(
                        batch_lines.error_line(
                            custom_id, code=error.code or error.type, message=f"line {number}: {error.message}"
                        )
                    )
                    continue
                except InputProblem as problem:
                    bad.append(batch_lines.error_line(custom_id, code="invalid_value", message=f"line {number}: {problem}"))
                    continue
                job_record.update({"surface": "openai", BATCH_FIELD: record["id"], CUSTOM_ID_FIELD: custom_id})
                if endpoint != JOBS:  # the response is shaped by the request (b64_json images): only that is kept
                    job_record[REQUEST_FIELD] = json.dumps(rendering_fields(body), separators=(",", ":"))
                made.append((custom_id, job, job_record, job_input))
            # Deterministic requests computed before are born succeeded: their cache entries, read at once.
            looked = [
                creation.cache_entry(job, job_record, job_input, settings=settings) for _, job, job_record, job_input in made
            ]
            wanted = [entry for entry in looked if entry is not None]
            hits = dict(zip(wanted, await store.redis.mget(wanted), strict=True)) if wanted else {}
            queued: list[tuple[dict[str, str], str, str]] = []
            for (custom_id, _, job_record, job_input), entry in zip(made, looked, strict=True):
                entries.append(f"{job_record['id']}:{custom_id}")
                cached = hits.get(entry) if entry is not None else None
                if cached is not None:
                    born.append((job_record, cached))
                    continue
                engine = job_record["engine"]
                message = task_message(job_id=job_record["id"], engine=engine, input=job_input, tenant=tenant)
                queued.append((job_record, queues[engine], message))
            # 4. The part stored and queued once the part before is (the first one's refusal
            #    stops the batch before anything else is sent).
            first = storing is None
            if storing is not None:
                await storing
            if queued:
                sent.extend(job_record["id"] for job_record, _, _ in queued)
                storing = asyncio.create_task(
                    store.create_many(
                        tenant, queued, max_jobs=caller.max_jobs or 0, admit=admit if first else None, admitted=not first
                    )
                )
                await asyncio.sleep(0)  # it starts: packed and sent, it waits on Redis while the next part is read
        if storing is not None:
            await storing
    except QuotaExceeded as refused:
        raise BatchFileError("quota_exceeded", f"{refused}: the batch's {sum(admit.values())} requests do not fit") from None
    except QueueFull as refused:
        raise BatchFileError("queue_full", f"{refused}: the batch's requests do not fit") from None
    finally:
        if storing is not None and not storing.done():  # failed elsewhere: let the part in flight land
            await asyncio.wait([storing])
    # 5. The cache hits, once the batch was admitted.
    if born:
        async with store.redis.pipeline(transaction=True) as pipe:
            for job_record, cached in born:
                creation.queue_birth(pipe, store, job_record, cached, settings=settings)
                sent.append(job_record["id"])
            await pipe.execute()
    return entries, bad


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


# --- advancing a batch ----------------------------------------------------------------------


async def advance(app: FastAPI, record: dict[str, str]) -> dict[str, str]:
    """The batch after a look at its jobs: its counts; once every job has ended, its files and
    final status (written by one API process: the others answer it as it stands). Past its
    window, its unfinished jobs are canceled and it ends ``expired``."""
    status = BatchStatus(record["status"])
    if status not in (BatchStatus.in_progress, BatchStatus.cancelling, BatchStatus.finalizing):
        return record
    settings = settings_of(app)
    store: AsyncJobStore = app.state.store
    client = store.redis
    counted, done = await batches.look(client, settings, record)
    if not done and status == BatchStatus.in_progress and time.time() > float(record["expires_at"]):
        ids = await batches.unchecked(client, settings, {**record, **counted})
        await store.cancel_many(ids, tenant=record["tenant"], reason=f"batch {record['id']}'s completion window ran out")
        expiring = await batches.update_if(
            client, settings, record, expect=(BatchStatus.in_progress,), ending=BatchStatus.expired.value
        )
        record = expiring or await batches.get(client, settings, record["id"], tenant=record["tenant"])
        counted, done = await batches.look(client, settings, {**record, **counted})
    if not done:
        if any(record.get(name) != value for name, value in counted.items()):
            record = await batches.update(client, settings, record, **counted)
        return record
    return await finalize(app, record, await batches.job_ids(client, settings, record["id"]), counted)


async def finalize(app: FastAPI, record: dict[str, str], entries: list[str], counted: dict[str, str]) -> dict[str, str]:
    """Write the output and error files of a batch whose jobs have all ended, and end it."""
    settings = settings_of(app)
    client = app.state.store.redis
    holder = batches.holder_id()
    if not await batches.lock(client, settings, record["id"], holder):
        return record  # another process is writing its files
    # Held while its files are rendered, however long, and let go if writing them fails.
    lock_key = Keys(settings.redis_prefix).batch_lock(record["id"])
    async with batches.renewed(client, lock_key, holder, ttl_s=batches.LOCK_S):
        return await _finalize(app, record, entries, counted, holder=holder)


async def _finalize(
    app: FastAPI, record: dict[str, str], entries: list[str], counted: dict[str, str], *, holder: str
) -> dict[str, str]:
    settings = settings_of(app)
    client = app.state.store.redis
    now = repr(time.time())
    # From in_progress or cancelling only, reading `ending` as it is now: a cancel that came
    # after the look is either in it, or refused (the batch is finalizing).
    finalizing = await batches.update_if(
        client,
        settings,
        record,
        expect=(BatchStatus.in_progress, BatchStatus.cancelling, BatchStatus.finalizing),
        status=BatchStatus.finalizing.value,
        finalizing_at=now,
        **counted,
    )
    if finalizing is None:  # ended meanwhile
        return await batches.get(client, settings, record["id"], tenant=record["tenant"])
    record = finalizing
    ids = [entry.partition(":")[0] for entry in entries]
    jobs = await batches.jobs(client, settings, ids)
    malformed = await batches.malformed_lines(client, settings, record["id"])
    # Images asked for as b64_json are read from the artifact store, a blocking read.
    output, errors = await asyncio.to_thread(render, app, record, entries, jobs)
    errors = malformed + errors
    written: list[dict[str, Any]] = []
    fields = {**counted, "status": record.get("ending") or BatchStatus.completed.value}
    fields[f"{fields['status']}_at"] = repr(time.time())
    for lines, kind in ((output, "output"), (errors, "errors")):
        if lines:
            file_id = files.new_file_id()
            written.append(
                {
                    "file_id": file_id,
                    "tenant": record["tenant"],
                    "filename": f"{record['id']}_{kind}.jsonl",
                    "purpose": "batch_output",
                    "content": batch_lines.jsonl(lines),
                }
            )
            fields["output_file_id" if kind == "output" else "error_file_id"] = file_id
    if not await batches.finish(client, settings, record, holder=holder, files=written, **fields):
        return record
    return {**record, **fields}


def render(
    app: FastAPI, record: dict[str, str], entries: list[str], jobs: list[dict[str, str]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The output lines (requests whose job succeeded) and error lines (the rest) of the
    batch's jobs, each line's body what its endpoint's route answers."""
    settings = settings_of(app)
    endpoint, root = record["endpoint"], record["base_url"]
    signer = url_signer(app.state.signer_redis, settings)
    output: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for entry, job in zip(entries, jobs, strict=True):
        job_id, _, custom_id = entry.partition(":")
        if not job:
            errors.append(
                batch_lines.error_line(
                    custom_id, code="job_expired", message=f"job {job_id}'s retention ran out before the batch ended"
                )
            )
            continue
        succeeded = job.get("status") == JobStatus.succeeded.value
        if endpoint == JOBS:
            view = job_view(job, base_url=root, signer=signer)
            status_code = 200 if succeeded else job_failure(job).status
            (output if succeeded else errors).append(
                batch_lines.response_line(job_id, custom_id, status_code=status_code, body=view)
            )
            continue
        try:
            request_body = json.loads(job.get(REQUEST_FIELD) or "{}")
            body = response_for(
                endpoint, job, request_body=request_body, base_url=root, signer=signer, artifacts=app.state.artifacts
            )
        except OpenAIError as error:
            errors.append(batch_lines.response_line(job_id, custom_id, status_code=error.status, body=error.body()))
            continue
        output.append(batch_lines.response_line(job_id, custom_id, status_code=200, body=body))
    return output, errors


async def sweep(app: FastAPI) -> None:
    """Advance the open batches every ``SWEEP_S``, so each completes though nobody reads it."""
    settings = settings_of(app)
    start = 0  # with more open batches than a sweep takes, each sweep takes the next ones
    while True:
        await asyncio.sleep(SWEEP_S)
        try:
            client = app.state.store.redis
            found = await batches.open_batches(client, settings, start=start, count=SWEEP_BATCHES)
            start = start + len(found) if len(found) == SWEEP_BATCHES else 0
            for batch_id in found:
                tenant = await batches.tenant_of(client, settings, batch_id)
                if tenant is None:
                    await batches.forget_open(client, settings, batch_id)
                    continue
                await advance(app, await batches.get(client, settings, batch_id, tenant=tenant))
        except asyncio.CancelledError:
            raise
        except (redis.exceptions.RedisError, BatchNotFound) as error:
            log.warning("batch sweep: %s; again in %g s", error, SWEEP_S)
        except Exception:
            log.exception("batch sweep failed; again in %g s", SWEEP_S)
