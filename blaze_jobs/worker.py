"""How a worker runs one job: from the Celery task's job id to the job's final record.

A worker process serves one engine on one device. Its ``WorkerContext`` holds what it loads
once (``blaze_jobs.worker_context``); ``run_job`` is what each task thread does with it, and
an ``Attempt`` (``blaze_jobs.attempt``) records how the job's attempt ends.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis

from blaze_jobs import cache, events, faults, inboxes, logs, metrics, progress
from blaze_jobs.artifacts import ArtifactStore, artifact_name, artifact_url
from blaze_jobs.attempt import Attempt
from blaze_jobs.broker import requeue_push
from blaze_jobs.engines.base import Artifact, EngineRequest
from blaze_jobs.errors import HandedBack, JobCanceled, JobConflict, JobNotFound, RequestError, WorkerFault
from blaze_jobs.jobs import JobStatus
from blaze_jobs.records import tenant_of
from blaze_jobs.worker_context import WorkerContext, current_context

log = logging.getLogger("blaze_jobs.worker")


def run_job(
    job_id: str,
    *,
    engine: str,
    context: WorkerContext | None = None,
    tenant: str | None = None,
    faulted_on: Sequence[str] = (),
    passes: int = 0,
) -> str:
    """Run the job and record its end. Returns the status the job ended in (or was found in).

    ``tenant`` (None: the default tenant), ``faulted_on`` and ``passes`` come from the job's
    message (``broker.task_message``)."""
    context = context or current_context(engine)
    with logs.job_context(job=job_id, engine=engine, worker=context.name):
        return _run_job(context, job_id, tenant=tenant, faulted_on=faulted_on, passes=passes)


def _run_job(context: WorkerContext, job_id: str, *, tenant: str | None, faulted_on: Sequence[str], passes: int) -> str:
    settings = context.settings

    # 1. Take the job, unless the breaker says this worker must not (its message goes back to
    #    the queue), or the job faulted here before and a live peer can try it (the message
    #    goes to that peer's inbox, to run there next: ``inboxes.py``). Only a
    #    queued job starts; a canceled one is dropped here, one running or ended was
    #    delivered twice, and a missing one has expired.
    if context.name in faulted_on and passes < settings.fault_handbacks:
        peers = faults.live_peers(context.redis, settings, name=context.name, engine=context.engine_name)
        if peers:
            return hand_back(context, job_id, passes=passes + 1, to=random.choice(peers))
    if not context.breaker.allow():
        return hand_back(context, job_id)
    try:
        return _take_and_run(context, job_id, tenant or settings.default_tenant)
    except BaseException:
        # No verdict on the device (Redis failed us, say): a half-open breaker must not
        # wait for ever on a probe that will never report.
        context.breaker.release_probe()
        raise


def _take_and_run(context: WorkerContext, job_id: str, tenant: str) -> str:
    store, settings = context.store, context.settings
    try:
        # The message names the job's tenant, whose indexes the take moves it between: the
        # take reads nothing first.
        record = store.take(
            job_id, tenant=tenant, worker=context.name, lease_ms=int(settings.lease_s * 1000), started_at=repr(time.time())
        )
    except JobNotFound:
        context.breaker.release_probe()
        log.warning("job %s not found (expired before it ran); dropping its message", job_id)
        return "missing"
    except JobConflict:
        context.breaker.release_probe()
        status = store.status(job_id)
        log.info("job %s is %s; not running it again", job_id, status.value if status else "gone")
        return status.value if status else "missing"
    logs.bind(model=record.get("model"))
    number = int(record["attempts"])
    token = f"{context.name}:{number}"
    context.heartbeat.hold(job_id, token)
    try:
        return _run_taken(context, record, number)
    finally:
        context.heartbeat.release(job_id, token)
        context.jobs_run += 1


def _run_taken(context: WorkerContext, record: dict[str, str], number: int) -> str:
    settings = context.settings
    tenant = tenant_of(record.get("tenant"), settings)
    attempt = Attempt(context, record, number, tenant=tenant)
    attempt.started()

    # 2. Read the request. Whatever fails here is the request's content, not this worker.
    try:
        job_input = json.loads(record["input"])
        cacheable = record.get("cache") != "bypass" and cache.cacheable(record["engine"], job_input)
        key = (
            cache.cache_key(engine=record["engine"], model=record["model"], input=job_input, tenant=tenant, settings=settings)
            if cacheable
            else None
        )
    except Exception as error:
        context.breaker.release_probe()
        return attempt.failed("request", f"unreadable input: {type(error).__name__}: {error}")

    # 3. A deterministic request computed before (here or anywhere) is not computed again,
    #    nor twice at once in this worker: the first computes, identical ones wait for it.
    if key is not None:
        cached = _looked_up(context, "local", context.local_cache.get(key))
        if cached is None:
            cached = _looked_up(context, "redis", _l2_get(context, key))
        if cached is None:
            cached = _looked_up(context, "in_flight", context.inflight.follow(key, timeout=settings.batch_timeout_s))
        if cached is not None:
            context.breaker.release_probe()
            # The artifacts it points at live on as long as the job that now shows them, and
            # its tenant owns them.
            with context.redis.pipeline(transaction=False) as pipe:
                cache.queue_renew(pipe, json.loads(cached), tenant=tenant, settings=settings)
                pipe.execute()
            return attempt.succeeded(cached, batch_size=None, cache_hit=True)
    try:
        return _compute(context, record, job_input, attempt, key, tenant)
    finally:
        if key is not None:
            context.inflight.done(key)


def _compute(
    context: WorkerContext, record: dict[str, str], job_input: dict[str, Any], attempt: Attempt, key: str | None, tenant: str
) -> str:
    settings, job_id = context.settings, record["id"]

    # 4. Hand the job to the batcher and wait for its batch, at most the watchdog's time.
    text = events.TextStream(context.redis, prefix=settings.redis_prefix, job_id=job_id, settings=settings)
    request = EngineRequest(
        job_id=job_id,
        model=record["model"],
        input=job_input,
        # An input artifact must be one of this tenant's (the API checked it at create too).
        tenant=tenant,
        should_stop=lambda: context.heartbeat.is_canceled(job_id),
        # Progress leaves from a thread of its own, throttled: a step pays a dict assignment.
        on_progress=progress.progress_callback(context.redis, settings, job_id),
        # Text arrives on the engine's callback thread, in order; each piece is one stream
        # entry, with the output so far (but its text) on the job for a cancel to end it with.
        on_delta=text.on_delta,
        on_partial=text.on_partial,
    )
    try:
        result = context.batcher.submit(request).result(timeout=settings.batch_timeout_s)
    except JobCanceled:
        context.breaker.release_probe()
        log.info("job %s canceled while running", job_id)
        return attempt.canceled()
    except RequestError as error:
        context.breaker.release_probe()
        return attempt.failed("request", str(error))
    except HandedBack:
        return attempt.requeue(count_attempt=False)
    except FutureTimeout:
        return _worker_fault(context, attempt, record, f"batch overran its watchdog of {settings.batch_timeout_s:.0f} s")
    except Exception as error:  # on the device: WorkerFault, or an engine bug (engines.base)
        reason = str(error) if isinstance(error, WorkerFault) else f"{type(error).__name__}: {error}"
        return _worker_fault(context, attempt, record, reason)

    # 5. Store what it made (its files are encoded here, off the device thread), make the
    #    job's tenant the owner of its files, remember it for the next identical request,
    #    record success.
    try:
        output = _store_artifacts(result.output, context.artifacts)
    except redis.RedisError:
        raise
    except ForgedArtifact as error:
        context.breaker.release_probe()
        return attempt.failed("request", str(error))
    except Exception as error:  # an encoder failed on what the engine made
        return _worker_fault(context, attempt, record, f"could not encode the output: {type(error).__name__}: {error}")
    context.breaker.record_success()
    output_json = json.dumps(output, separators=(",", ":"))
    if result.output.get("finish_reason") == "canceled":
        # A text job stopped by a cancel keeps the text it had streamed; a partial text is never cached.
        return attempt.canceled()
    # Owners before the job shows its output, so its tenant may fetch the files at once.
    with context.redis.pipeline(transaction=False) as pipe:
        cache.queue_own(pipe, output, tenant=tenant, settings=settings)
        if key is not None:
            cache.queue_store(pipe, context.cache_keys, key, output_json, settings=settings)
        if len(pipe):
            pipe.execute()
    if key is not None:
        context.local_cache.put(key, output_json)
        context.inflight.publish(key, output_json)
        cache.trim(context.redis, context.cache_keys, max_entries=settings.cache_max_entries)
    return attempt.succeeded(output_json, batch_size=result.batch_size, cache_hit=False)


def _looked_up(context: WorkerContext, layer: str, found: str | None) -> str | None:
    """``found``, a lookup in one layer of the result cache, counted (metrics on)."""
    if metrics.enabled():
        metrics.CACHE_LOOKUPS.labels(context.engine_name, layer, "miss" if found is None else "hit").inc()
    return found


def _l2_get(context: WorkerContext, key: str) -> str | None:
    value = context.redis.get(context.cache_keys.entry(key))
    return value.decode() if isinstance(value, bytes) else value


def _worker_fault(context: WorkerContext, attempt: Attempt, record: dict[str, str], reason: str) -> str:
    """A fault on the device, the worker's or the job's own (``faults``); the job runs again
    elsewhere while attempts remain."""
    log.error("worker fault on job %s: %s", attempt.job_id, reason)
    poison = faults.poison_error(record, context.name, reason)
    if poison is not None:
        context.breaker.release_probe()
        return attempt.failed("request", poison)
    if faults.counts_against(record, context.name):
        context.breaker.record_failure(reason)
        faults.note_fault(context.store, attempt.job_id, tenant=attempt.tenant, attempt=attempt.number, worker=context.name)
    else:
        context.breaker.release_probe()
    if attempt.number < context.settings.max_attempts:
        return attempt.requeue(count_attempt=True)
    return attempt.failed("worker_fault", f"failed on {attempt.number} attempts on {context.name}; last: {reason}")


def hand_back(context: WorkerContext, job_id: str, *, passes: int = 0, to: str | None = None) -> str:
    """Put a job this worker will not run back on its queue, untouched, for a peer: or, when
    ``to`` names a live peer, in that peer's inbox, for it to run next (``inboxes.py``)."""
    try:
        record = context.store.get(job_id)
    except JobNotFound:
        return "missing"
    if record["status"] != JobStatus.queued.value:
        return record["status"]
    push = requeue_push(context.settings, record, passes=passes)
    if to is not None:
        inboxes.hand_to(context.redis, context.settings, engine=context.engine_name, worker=to, message=push["message"])
        log.info("job %s handed to %s (it faulted here)", job_id, to)
        return "handed_back"
    (context.redis.lpush if push.get("back") else context.redis.rpush)(push["key"], push["message"])
    log.info("job %s handed back to the queue (breaker %s)", job_id, context.breaker.state.value)
    return "handed_back"


class ForgedArtifact(RequestError):
    """An output names an artifact URL its job did not make (an echo of a request that
    names one): a job view would sign it, and its tenant become an owner of another's file."""


def _store_artifacts(value: Any, artifacts: ArtifactStore) -> Any:
    """The output with each ``Artifact`` stored and replaced by its URL and digest. An
    artifact URL anywhere else in it is refused (``ForgedArtifact``).

    It walks the output with a stack of its own, not by recursion: an output (an echo's is
    its input) may be nested deeper than Python's recursion limit."""

    def stored(item: Any) -> Any:
        if isinstance(item, Artifact):
            key = artifacts.put(item.data, item.extension)
            return {"url": artifact_url(key), "content_type": item.content_type, **item.meta, "sha256": key.split(".", 1)[0]}
        if isinstance(item, dict):
            if artifact_name(item.get("url")) is not None:
                raise ForgedArtifact(f"the output names an artifact it did not make: {item['url']!r}")
            copy: dict[str, Any] = dict(item)
            pending.append(copy)
            return copy
        if isinstance(item, list):
            copy_list = list(item)
            pending.append(copy_list)
            return copy_list
        return item

    pending: list[Any] = []
    top = stored(value)
    while pending:
        container = pending.pop()
        for k, v in container.items() if isinstance(container, dict) else enumerate(container):
            container[k] = stored(v)
    return top
