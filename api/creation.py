"""The one create path: every surface that makes a job (``POST /v1/jobs``, Replicate's
predictions, OpenAI's images and chat) makes it here, so each gets the same bounds, tenant,
quota, queue bound, cache, idempotency and webhooks, and the same job record."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from functools import cache as cache_function
from typing import Any

import redis
from fastapi import Request

from blaze_jobs import cache, metrics
from blaze_jobs.api_keys import ApiKey
from blaze_jobs.broker import queue_key, task_message
from blaze_jobs.errors import ClaimTakenOver, QueueFull, QuotaExceeded
from blaze_jobs.jobs import new_record
from blaze_jobs.records import queue_create, text
from blaze_jobs.redis_config import refusal
from blaze_jobs.settings import Settings
from blaze_jobs.store import AsyncJobStore

from . import bounds, connections, idempotency, input_images, webhooks
from . import metrics as api_metrics
from .problems import InputProblem
from .request_context import settings_of

#: The surface label of a job made through ``POST /v1/jobs`` (the others name theirs).
SURFACE = "blaze"


async def create(
    request: Request,
    caller: ApiKey,
    body: Any,
    *,
    extra: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
) -> tuple[dict[str, str], bool]:
    """Store and queue the job ``body`` (a ``JobCreate``) asks for, as ``caller``'s tenant's:
    its record, and True; or, for a retry carrying the ``Idempotency-Key`` header (or
    ``idempotency_key``) of an earlier create, that create's job and False. ``extra`` adds
    fields to the record (the surface that made it, a batch line's ``custom_id``)."""
    settings = settings_of(request.app)
    api_metrics.note_engine(request.scope, body.engine)
    # 1. Bounds that belong to the deployment, not the schema.
    record, job_input = job_record(body, tenant=caller.tenant, settings=settings)
    record.update(await webhooks.webhook_fields(body, settings))
    # Input images: their form and bounds, an artifact's owner, an https URL's host.
    await input_images.check(request, body, tenant=caller.tenant, settings=settings)
    if extra:
        record.update(extra)
    store: AsyncJobStore = request.app.state.store
    # A retry with the Idempotency-Key of an earlier create gets that create's job.
    original = await idempotency.claim(request, tenant=caller.tenant, body=body, job_id=record["id"], key=idempotency_key)
    if original is not None:
        api_metrics.job_answered(request.scope)
        return original, False
    try:
        # 2. A deterministic request computed before is born succeeded, with no worker involved.
        cached = await cached_output(store, body, record, job_input, settings=settings)
        # 3. Store the job and publish its Celery message (or its cached result) in one round trip.
        if cached is None:
            message = task_message(job_id=record["id"], engine=record["engine"], input=job_input, tenant=caller.tenant)
            # Admitted in the same step: the tenant's quota (the key's) and the queue's bound.
            await store.create_queued(
                record,
                queue=queue_key(settings, record["engine"]),
                message=message,
                max_jobs=caller.max_jobs or 0,
                claim=idempotency.held(request),
            )
        else:
            async with store.redis.pipeline(transaction=True) as pipe:
                claim = idempotency.held(request)
                if claim is not None:  # born only while this create holds its claim (create.lua's rule)
                    await pipe.watch(claim[0])
                    if text(await pipe.get(claim[0]) or b"") != claim[1]:
                        raise ClaimTakenOver(record["id"])
                    pipe.multi()
                queue_birth(pipe, store, record, cached, settings=settings)
                try:
                    await pipe.execute()
                except redis.exceptions.WatchError:  # the claim changed hands after the look
                    raise ClaimTakenOver(record["id"]) from None
    except (QuotaExceeded, QueueFull, redis.exceptions.ResponseError, connections.Busy) as refused:
        # Refused (quota, full queue, full Redis, no connection free) and nothing stored: a
        # retry may create it. A connection lost mid-create may have stored the job: its
        # claim stays, and a retry answers that job, or takes the claim over once stale.
        await idempotency.release(request)
        reason = refusal_reason(refused)
        if reason is not None:
            api_metrics.rejected(record["engine"], reason)
        raise
    count_created(record["engine"], record.get("surface", SURFACE), cached=cached is not None)
    api_metrics.job_answered(request.scope)
    return record, True


def count_created(engine: str, surface: str, count: int = 1, *, cached: bool) -> None:
    """Count ``count`` jobs stored: queued, or (``cached``) born from the cache."""
    if metrics.enabled():
        api_metrics.TALLY.inc(created_counter(engine, surface), count)
        if cached:
            metrics.JOBS_CACHED.labels(engine).inc(count)


@cache_function
def created_counter(engine: str, surface: str) -> Any:
    """The created-jobs counter of an engine and surface (few of each): ``labels()`` takes a
    lock and builds its key on every call, on the create path."""
    return metrics.JOBS_CREATED.labels(engine, surface)


def refusal_reason(refused: Exception) -> str | None:
    """The reason a refused create is counted under: the tenant's quota, or the deployment's
    backpressure (a full queue, a Redis refusing writes: at its memory limit, above all);
    None for an API bound of its own (no connection free) or another error Redis answered."""
    if isinstance(refused, QuotaExceeded):
        return "quota"
    if isinstance(refused, QueueFull) or (isinstance(refused, redis.exceptions.ResponseError) and refusal(refused)):
        return "backpressure"
    return None


# --- the pieces a create is made of, which a batch file's creates share -------------------


def job_record(body: Any, *, tenant: str, settings: Settings, job_id: str | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """The record of a new queued job of ``tenant`` for ``body`` (a ``JobCreate``), and its
    input, once within the deployment's bounds (InputProblem naming the field otherwise).
    ``job_id``: the job's id, made beforehand (``new_job_ids``); a new one by default."""
    engine = body.engine
    model = body.model or settings.default_model(engine)
    if model not in settings.allowed_models(engine):
        raise InputProblem("model", f"unknown model {model!r} for engine {engine}; known: {settings.allowed_models(engine)}")
    bounds.check_bounds(body, settings)
    job_input = body.input.model_dump(exclude_none=True)
    record = new_record(
        job_id=job_id or str(uuid.uuid4()), tenant=tenant, engine=engine, model=model, input=job_input, created_at=time.time()
    )
    bounds.check_input(job_input, stored=record["input"], settings=settings)
    return record, job_input


def cache_entry(body: Any, record: dict[str, str], job_input: dict[str, Any], *, settings: Settings) -> str | None:
    """The L2 cache key a new job may be answered from: None when it is not deterministic or
    asks to bypass the cache (then its record says so)."""
    if body.cache == "bypass":
        record["cache"] = "bypass"
        return None
    engine = record["engine"]
    if not cache.cacheable(engine, job_input):
        return None
    key = cache.cache_key(engine=engine, model=record["model"], input=job_input, tenant=record["tenant"], settings=settings)
    return cache.CacheKeys(settings.redis_prefix).entry(key)


async def cached_output(
    store: AsyncJobStore, body: Any, record: dict[str, str], job_input: dict[str, Any], *, settings: Settings
) -> Any:
    """The cached output a deterministic request computed before gets (bytes), or None."""
    entry = cache_entry(body, record, job_input, settings=settings)
    if entry is None:
        return None
    cached = await store.redis.get(entry)
    if metrics.enabled():
        metrics.CACHE_LOOKUPS.labels(record["engine"], "redis", "miss" if cached is None else "hit").inc()
    return cached


def queue_birth(pipe: Any, store: AsyncJobStore, record: dict[str, str], cached: Any, *, settings: Settings) -> None:
    """Queue on ``pipe`` the commands that store ``record`` born succeeded with the ``cached``
    output, with no worker involved."""
    output = text(cached)
    now = repr(time.time())
    record.update(status="succeeded", output=output, started_at=now, completed_at=now, cache_hit="1")
    queue_create(pipe, store.keys, record, ttl_s=settings.job_ttl_s)
    # The images outlive the new job as long as the job itself, and its tenant owns them.
    cache.queue_renew(pipe, json.loads(output), tenant=record["tenant"], settings=settings)


def new_job_ids(count: int) -> list[str]:
    """``count`` new job ids, random UUIDs (version 4) as ``uuid.uuid4`` makes them, from one
    read of the system's randomness: a fifth of the time each, for a batch file's jobs."""
    raw = bytearray(os.urandom(16 * count))
    ids = []
    for start in range(0, len(raw), 16):
        raw[start + 6] = (raw[start + 6] & 0x0F) | 0x40  # version 4
        raw[start + 8] = (raw[start + 8] & 0x3F) | 0x80  # RFC 4122 variant
        h = raw[start : start + 16].hex()
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids
