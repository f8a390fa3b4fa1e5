"""A batch advancing: its counts as its jobs end; once every job has ended, its output and
error files and its final status, written by one API process at a time (a lock); past its
window, ``expired``. It advances when it is read and in the sweep every API process runs
(``SWEEP_S``), so it completes though nobody reads it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import redis.exceptions
from fastapi import FastAPI

from blaze_jobs import batch_lines, batches, files
from blaze_jobs.artifacts import url_signer
from blaze_jobs.batches import REQUEST_FIELD, BatchNotFound, BatchStatus
from blaze_jobs.jobs import JobStatus, job_view
from blaze_jobs.keys import Keys
from blaze_jobs.store import AsyncJobStore

from .batch_creation import JOBS
from .openai_bodies import job_failure, response_for
from .openai_errors import OpenAIError
from .request_context import settings_of

log = logging.getLogger("blaze_jobs.api.batch_progress")

#: How often each API process advances the open batches: a batch nobody reads completes
#: within this of its last job's end.
SWEEP_S = 2.0
#: Open batches one sweep advances, soonest to expire first (the next sweep takes the next ones).
SWEEP_BATCHES = 100


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
