"""Making a batch's jobs from its input file: each good line read and checked (off the
event loop, a part at a time), cache hits born succeeded, and the rest stored and queued by
the create script, a part per call (``AsyncJobStore.create_many``), the first of which admits
the whole batch against the tenant's quota and the queues' bounds."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from typing import Any

from fastapi import Request
from pydantic import TypeAdapter, ValidationError

from blaze_jobs import batch_lines, metrics
from blaze_jobs.batch_lines import BatchFileError
from blaze_jobs.batches import BATCH_FIELD, CUSTOM_ID_FIELD, REQUEST_FIELD
from blaze_jobs.broker import queue_key, task_message
from blaze_jobs.errors import QueueFull, QuotaExceeded
from blaze_jobs.jobs import JobCreate
from blaze_jobs.settings import ENGINES, Settings
from blaze_jobs.store import AsyncJobStore

from . import creation, input_images, webhooks
from . import metrics as api_metrics
from .openai_bodies import ENGINE_OF, job_for
from .openai_errors import OpenAIError
from .problems import InputProblem, field_name
from .request_context import settings_of

log = logging.getLogger("blaze_jobs.api.batch_creation")

#: Blaze's own batch endpoint: each line a ``POST /v1/jobs`` body.
JOBS = "/v1/jobs"
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


def count_lookups(made: list[tuple[Any, ...]], looked: list[str | None], hits: dict[str, Any]) -> None:
    """Count a part's result-cache lookups (its deterministic lines'), by engine and result."""
    results = Counter(
        (job_record["engine"], "miss" if hits.get(entry) is None else "hit")
        for (_, _, job_record, _), entry in zip(made, looked, strict=True)
        if entry is not None
    )
    for (engine, result), count in results.items():
        metrics.CACHE_LOOKUPS.labels(engine, "redis", result).inc(count)


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
    queued_by_engine: Counter[str] = Counter()  # for the created-jobs metric
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
                    # A line's input images are checked as a create checks them: one that no
                    # job could read (bad form, another tenant's artifact) fails that line only.
                    await input_images.check(request, job, tenant=tenant, settings=settings)
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
            if metrics.enabled():
                count_lookups(made, looked, hits)
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
                queued_by_engine.update(job_record["engine"] for job_record, _, _ in queued)
                sent.extend(job_record["id"] for job_record, _, _ in queued)
                storing = asyncio.create_task(
                    store.create_many(
                        tenant, queued, max_jobs=caller.max_jobs or 0, admit=admit if first else None, admitted=not first
                    )
                )
                await asyncio.sleep(0)  # it starts: packed and sent, it waits on Redis while the next part is read
        if storing is not None:
            await storing
        for engine, count in queued_by_engine.items():
            creation.count_created(engine, "openai", count, cached=False)
    except (QuotaExceeded, QueueFull) as refused:
        # The batch is refused whole: each of its requests is a create refused.
        reason = creation.refusal_reason(refused) or "backpressure"
        for (engine, _), count in admit.items():
            api_metrics.rejected(engine, reason, count)
        if isinstance(refused, QueueFull):
            raise BatchFileError("queue_full", f"{refused}: the batch's requests do not fit") from None
        raise BatchFileError("quota_exceeded", f"{refused}: the batch's {sum(admit.values())} requests do not fit") from None
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
        for engine, count in Counter(job_record["engine"] for job_record, _ in born).items():
            creation.count_created(engine, "openai", count, cached=True)
    return entries, bad
