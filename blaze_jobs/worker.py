"""How a worker runs one job: from the Celery task's job id to the job's final record.

A worker process serves one engine on one device. ``Runtime`` holds what it loads once
(settings, Redis, the engine, the batcher, the breaker, the heartbeat); ``run_job`` is what
each task thread does with it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Sequence

import redis
from redis.backoff import ExponentialBackoff

from blaze_jobs import cache, events, faults, progress
from blaze_jobs.artifacts import ArtifactStore, artifact_store, artifact_url
from blaze_jobs.batching import Batcher
from blaze_jobs.breaker import CircuitBreaker
from blaze_jobs.broker import requeue_push
from blaze_jobs.engines import create_engine
from blaze_jobs.engines.base import Artifact, Engine, EngineRequest
from blaze_jobs.errors import HandedBack, JobCanceled, JobConflict, JobNotFound, RequestError, WorkerFault
from blaze_jobs.heartbeat import Heartbeat
from blaze_jobs.jobs import JobStatus
from blaze_jobs.redis_config import WaitingRetry
from blaze_jobs.settings import Settings, get_settings
from blaze_jobs.store import JobStore, lease_owner

log = logging.getLogger("blaze_jobs.worker")

#: Retries of a Redis command (at most a second apart) before a worker gives up on it.
REDIS_RETRIES = 60
#: A worker passing on a job that faulted on it waits this long times the passes so far: a
#: peer whose task threads are all busy gets a moment to free one and draw the job.
HANDBACK_PAUSE_S = 0.05


class Runtime:
    """What one worker process loads once and every job it runs shares."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: str,
        device: str | None = None,
        name: str | None = None,
        max_batch: int | None = None,
        max_wait_ms: float | None = None,
        on_open: Callable[[], None] = lambda: None,
        on_half_open: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.engine_name = engine
        self.device = device or settings.device
        self.name = name or f"{engine}-{os.getpid()}@{socket.gethostname()}"
        # A worker rides out a Redis restart: each command retries with back-off for about a
        # minute instead of failing the job it was recording.
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=10,
            # ... and a Redis at its memory limit, the same way (redis_config.WaitingRetry).
            retry=WaitingRetry(ExponentialBackoff(cap=1.0, base=0.05), REDIS_RETRIES),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
        )
        self.store = JobStore(self.redis, settings)
        self.artifacts: ArtifactStore = artifact_store(settings, self.redis)
        self.engine: Engine = create_engine(engine, settings, device=self.device, max_batch=max_batch)
        self.local_cache = cache.LocalCache(entries=settings.cache_local_entries, ttl_s=settings.cache_ttl_s)
        self.cache_keys = cache.CacheKeys(settings.redis_prefix)
        self.inflight = cache.InFlight()
        self.jobs_run = 0
        self.batched_jobs = 0
        self.device_busy_s = 0.0  # seconds the device thread spent running batches
        self.batcher = Batcher(
            self.engine,
            max_batch=max_batch or settings.max_batch,
            max_wait_ms=settings.max_wait_ms if max_wait_ms is None else max_wait_ms,
            on_batch=self._count_batch,
        )

        def opened() -> None:
            # Jobs waiting for the device go back to the queue for the worker's peers at once.
            self.batcher.fail_waiting(HandedBack("the worker's breaker opened"))
            on_open()

        self.breaker = CircuitBreaker(
            failures=settings.breaker_failures,
            cooldown_s=settings.breaker_cooldown_s,
            max_cooldown_s=settings.breaker_max_cooldown_s,
            on_open=opened,
            on_half_open=on_half_open,
            # GET /v1/workers shows each breaker change at once, not at the next beat.
            on_change=lambda state: self.heartbeat.publish_soon(),
        )
        self.heartbeat = Heartbeat(store=self.store, settings=settings, name=self.name, state=self.state)

    def _count_batch(self, size: int, elapsed: float) -> None:
        self.batched_jobs += size
        self.device_busy_s += elapsed
        log.info("batch of %d ran in %.3f s on %s", size, elapsed, self.device)

    def state(self) -> dict[str, Any]:
        """What ``GET /v1/workers`` shows of this worker."""
        batches = self.batcher.batches_run
        return {
            "engine": self.engine_name,
            "device": self.device,
            "breaker": self.breaker.snapshot(),
            "models": self.engine.loaded_models() if hasattr(self.engine, "loaded_models") else [],
            "batches_run": batches,
            "mean_batch_size": round(self.batched_jobs / batches, 3) if batches else None,
            "device_busy_s": round(self.device_busy_s, 3),
            "max_batch": self.batcher.max_batch,
            "jobs_run": self.jobs_run,
        }

    def start(self) -> None:
        self.heartbeat.start()

    def close(self) -> None:
        self.heartbeat.stop()
        self.batcher.close()
        self.breaker.close()
        self.engine.close()


# The process's runtimes, by engine: a job of one engine never runs on another's engine.
_runtimes: dict[str, Runtime] = {}
_runtimes_lock = threading.Lock()


def install_runtime(runtime: Runtime) -> None:
    """Make ``runtime`` the one this process's tasks of its engine use (worker start-up calls this)."""
    with _runtimes_lock:
        _runtimes[runtime.engine_name] = runtime


def current_runtime(engine: str) -> Runtime:
    """The process's runtime for ``engine``; created on first use when no start-up installed one."""
    with _runtimes_lock:
        runtime = _runtimes.get(engine)
        if runtime is None:
            runtime = _runtimes[engine] = Runtime(get_settings(), engine=engine)
            runtime.start()
        return runtime


def run_job(
    job_id: str, *, engine: str, runtime: Runtime | None = None, faulted_on: Sequence[str] = (), passes: int = 0
) -> str:
    """Run the job and record its end. Returns the status the job ended in (or was found in).

    ``faulted_on`` and ``passes`` come from the job's message (``broker.task_message``)."""
    runtime = runtime or current_runtime(engine)
    settings = runtime.settings

    # 1. Take the job, unless the breaker says this worker must not, or the job faulted here
    #    before and a live peer can try it: then its message goes back to the queue. Only a
    #    queued job starts; a canceled one is dropped here, one running or ended was
    #    delivered twice, and a missing one has expired.
    if runtime.name in faulted_on and passes < settings.fault_handbacks:
        if faults.live_peers(runtime.redis, settings, name=runtime.name, engine=runtime.engine_name):
            time.sleep(HANDBACK_PAUSE_S * passes)
            return hand_back(runtime, job_id, passes=passes + 1)
    if not runtime.breaker.allow():
        return hand_back(runtime, job_id)
    try:
        return _take_and_run(runtime, job_id)
    except BaseException:
        # No verdict on the device (Redis failed us, say): a half-open breaker must not
        # wait for ever on a probe that will never report.
        runtime.breaker.release_probe()
        raise


def _take_and_run(runtime: Runtime, job_id: str) -> str:
    store, settings = runtime.store, runtime.settings
    try:
        record = store.take(job_id, worker=runtime.name, lease_ms=int(settings.lease_s * 1000), started_at=repr(time.time()))
    except JobNotFound:
        runtime.breaker.release_probe()
        log.warning("job %s not found (expired before it ran); dropping its message", job_id)
        return "missing"
    except JobConflict:
        runtime.breaker.release_probe()
        status = store.status(job_id)
        log.info("job %s is %s; not running it again", job_id, status.value if status else "gone")
        return status.value if status else "missing"
    attempt = int(record["attempts"])
    token = f"{runtime.name}:{attempt}"
    runtime.heartbeat.hold(job_id, token)
    try:
        return _run_taken(runtime, record, attempt)
    finally:
        runtime.heartbeat.release(job_id, token)
        runtime.jobs_run += 1


def _run_taken(runtime: Runtime, record: dict[str, str], attempt: int) -> str:
    settings = runtime.settings
    job_id = record["id"]
    finish = _Finisher(runtime, job_id, attempt)

    # 2. Read the request. Whatever fails here is the request's content, not this worker.
    try:
        job_input = json.loads(record["input"])
        cacheable = record.get("cache") != "bypass" and cache.cacheable(record["engine"], job_input)
        key = cache.cache_key(engine=record["engine"], model=record["model"], input=job_input, settings=settings) if cacheable else None
    except Exception as error:
        runtime.breaker.release_probe()
        return finish.failed("request", f"unreadable input: {type(error).__name__}: {error}")

    # 3. A deterministic request computed before (here or anywhere) is not computed again,
    #    nor twice at once in this worker: the first computes, identical ones wait for it.
    if key is not None:
        cached = runtime.local_cache.get(key) or _l2_get(runtime, key)
        if cached is None:
            cached = runtime.inflight.follow(key, timeout=settings.batch_timeout_s)
        if cached is not None:
            runtime.breaker.release_probe()
            # The artifacts it points at live on as long as the job that now shows them.
            with runtime.redis.pipeline(transaction=False) as pipe:
                cache.queue_renew(pipe, json.loads(cached), settings=settings)
                pipe.execute()
            return finish.succeeded(cached, batch_size=None, cache_hit=True)
    try:
        return _compute(runtime, record, job_input, finish, key)
    finally:
        if key is not None:
            runtime.inflight.done(key)


def _compute(runtime: Runtime, record: dict[str, str], job_input: dict[str, Any], finish: "_Finisher", key: str | None) -> str:
    settings, job_id = runtime.settings, record["id"]

    # 4. Hand the job to the batcher and wait for its batch, at most the watchdog's time.
    text = events.TextStream(runtime.redis, prefix=settings.redis_prefix, job_id=job_id, settings=settings)
    request = EngineRequest(
        job_id=job_id,
        model=record["model"],
        input=job_input,
        should_stop=lambda: runtime.heartbeat.is_canceled(job_id),
        # Progress leaves from a thread of its own, throttled: a step pays a dict assignment.
        on_progress=progress.progress_callback(runtime.redis, settings, job_id),
        # Text arrives on the engine's callback thread, in order; each piece is one stream
        # entry, with the output so far (but its text) on the job for a cancel to end it with.
        on_delta=text.on_delta,
        on_partial=text.on_partial,
    )
    try:
        result = runtime.batcher.submit(request).result(timeout=settings.batch_timeout_s)
    except JobCanceled:
        runtime.breaker.release_probe()
        finish.release_lease()
        log.info("job %s canceled while running", job_id)
        return JobStatus.canceled.value
    except RequestError as error:
        runtime.breaker.release_probe()
        return finish.failed("request", str(error))
    except HandedBack:
        return finish.requeue(count_attempt=False)
    except FutureTimeout:
        return _worker_fault(runtime, finish, record, f"batch overran its watchdog of {settings.batch_timeout_s:.0f} s")
    except Exception as error:  # on the device: WorkerFault, or an engine bug (engines.base)
        reason = str(error) if isinstance(error, WorkerFault) else f"{type(error).__name__}: {error}"
        return _worker_fault(runtime, finish, record, reason)

    # 5. Store what it made (its files are encoded here, off the device thread), remember it
    #    for the next identical request, record success.
    try:
        output = _store_artifacts(result.output, runtime.artifacts)
    except redis.RedisError:
        raise
    except Exception as error:  # an encoder failed on what the engine made
        return _worker_fault(runtime, finish, record, f"could not encode the output: {type(error).__name__}: {error}")
    runtime.breaker.record_success()
    output_json = json.dumps(output, separators=(",", ":"))
    if result.output.get("finish_reason") == "canceled":
        # A text job stopped by a cancel keeps the text it had streamed; a partial text is never cached.
        return finish.canceled()
    if key is not None:
        runtime.local_cache.put(key, output_json)
        runtime.inflight.publish(key, output_json)
        with runtime.redis.pipeline(transaction=False) as pipe:
            cache.queue_store(pipe, runtime.cache_keys, key, output_json, settings=settings)
            pipe.execute()
        cache.trim(runtime.redis, runtime.cache_keys, max_entries=settings.cache_max_entries)
    return finish.succeeded(output_json, batch_size=result.batch_size, cache_hit=False)


def _l2_get(runtime: Runtime, key: str) -> str | None:
    value = runtime.redis.get(runtime.cache_keys.entry(key))
    return value.decode() if value is not None else None


def _worker_fault(runtime: Runtime, finish: "_Finisher", record: dict[str, str], reason: str) -> str:
    """A fault on the device, the worker's or the job's own (``faults``); the job runs again
    elsewhere while attempts remain."""
    log.error("worker fault on job %s: %s", finish.job_id, reason)
    poison = faults.poison_error(record, runtime.name, reason)
    if poison is not None:
        runtime.breaker.release_probe()
        return finish.failed("request", poison)
    if faults.counts_against(record, runtime.name):
        runtime.breaker.record_failure(reason)
        faults.note_fault(runtime.store, finish.job_id, attempt=finish.attempt, worker=runtime.name)
    else:
        runtime.breaker.release_probe()
    if finish.attempt < runtime.settings.max_attempts:
        return finish.requeue(count_attempt=True)
    return finish.failed("worker_fault", f"failed on {finish.attempt} attempts on {runtime.name}; last: {reason}")


def hand_back(runtime: Runtime, job_id: str, *, passes: int = 0) -> str:
    """Put a job this worker will not run back on its queue, untouched, for a peer."""
    try:
        record = runtime.store.get(job_id)
    except JobNotFound:
        return "missing"
    if record["status"] != JobStatus.queued.value:
        return record["status"]
    push = requeue_push(runtime.settings, record, passes=passes)
    (runtime.redis.lpush if push.get("back") else runtime.redis.rpush)(push["key"], push["message"])
    why = "it faulted here" if passes else f"breaker {runtime.breaker.state.value}"
    log.info("job %s handed back to the queue (%s)", job_id, why)
    return "handed_back"


class _Finisher:
    """The ways a started job's attempt ends, each one atomic step guarded by the attempt, so
    a worker whose lease was taken away can no longer change the job."""

    def __init__(self, runtime: Runtime, job_id: str, attempt: int) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.job_id = job_id
        self.attempt = attempt
        # The lease names this attempt: once the job was handed to another, its lease is not ours.
        self.lease = {"key": runtime.store.keys.lease(job_id), "owner": lease_owner(runtime.name, attempt)}

    def _end(self, to: JobStatus, **fields: Any) -> bool:
        try:
            self.store.transition(
                self.job_id, allowed=(JobStatus.running,), to=to, attempts=self.attempt, release=self.lease, **fields
            )
            return True
        except (JobConflict, JobNotFound):
            self.release_lease()
            return False

    def release_lease(self) -> None:
        self.store.release_lease(self.job_id, owner=self.lease["owner"])

    def succeeded(self, output_json: str, *, batch_size: int | None, cache_hit: bool) -> str:
        fields: dict[str, Any] = {"output": output_json, "completed_at": repr(time.time())}
        if batch_size is not None:
            fields["batch_size"] = batch_size
        if cache_hit:
            fields["cache_hit"] = 1
        return JobStatus.succeeded.value if self._end(JobStatus.succeeded, **fields) else self._now()

    def canceled(self) -> str:
        """Let go of a text job that a cancel stopped. The cancel ended it, and its output is
        the text streamed until then (store.cancel): the engine's own ends later, with tokens
        no client saw, so it is not stored, and the cancel's job.completed and the record agree."""
        self.release_lease()
        return JobStatus.canceled.value

    def failed(self, kind: str, message: str) -> str:
        error = json.dumps({"type": kind, "message": message})
        return JobStatus.failed.value if self._end(JobStatus.failed, error=error, completed_at=repr(time.time())) else self._now()

    def requeue(self, *, count_attempt: bool) -> str:
        record = self.store.get(self.job_id)
        fields: dict[str, Any] = {} if count_attempt else {"set_attempts": self.attempt - 1}
        if self._end(JobStatus.queued, push=requeue_push(self.runtime.settings, record), **fields):
            log.warning("job %s queued again (attempt %d)", self.job_id, self.attempt)
            return JobStatus.queued.value
        return self._now()

    def _now(self) -> str:
        status = self.store.status(self.job_id)
        return status.value if status else "missing"


def _store_artifacts(value: Any, artifacts: ArtifactStore) -> Any:
    """The output with each ``Artifact`` stored and replaced by its URL and digest.

    It walks the output with a stack of its own, not by recursion: an output (an echo's is
    its input) may be nested deeper than Python's recursion limit."""

    def stored(item: Any) -> Any:
        if isinstance(item, Artifact):
            key = artifacts.put(item.data, item.extension)
            return {"url": artifact_url(key), "content_type": item.content_type, **item.meta, "sha256": key.split(".", 1)[0]}
        if isinstance(item, dict):
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
        for k, v in (container.items() if isinstance(container, dict) else enumerate(container)):
            container[k] = stored(v)
    return top
