"""How a worker runs one job: from the Celery task's job id to the job's final record.

A worker process serves one engine on one device. ``Runtime`` holds what it loads once
(settings, Redis, the engine and its models); ``run_job`` is what each task does with it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from blaze_jobs.artifacts import ArtifactStore, artifact_store, artifact_url
from blaze_jobs.engines import create_engine
from blaze_jobs.engines.base import Artifact, Engine, EngineRequest
from blaze_jobs.errors import JobCanceled, JobConflict, JobNotFound, RequestError, WorkerFault
from blaze_jobs.jobs import JobStatus
from blaze_jobs.settings import Settings, get_settings
from blaze_jobs.store import JobStore

log = logging.getLogger("blaze_jobs.worker")


class Runtime:
    """What one worker process loads once and every job it runs shares."""

    def __init__(self, settings: Settings, *, engine: str, device: str | None = None) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=10,
            retry_on_timeout=True,
        )
        self.store = JobStore(self.redis, settings)
        self.artifacts: ArtifactStore = artifact_store(settings, self.redis)
        self.engine: Engine = create_engine(engine, settings, device=device)


_runtime: Runtime | None = None


def install_runtime(runtime: Runtime) -> None:
    """Make ``runtime`` the one this process's tasks use (worker start-up calls this)."""
    global _runtime
    _runtime = runtime


def current_runtime(engine: str) -> Runtime:
    """The process's runtime; created on first use when no start-up installed one."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(get_settings(), engine=engine)
    return _runtime


def run_job(job_id: str, *, engine: str, runtime: Runtime | None = None) -> str:
    """Run the job and record its end. Returns the status the job ended in (or was found in)."""
    runtime = runtime or current_runtime(engine)
    store = runtime.store

    # 1. Take the job. Only a queued job starts: a canceled one is dropped here, one that
    #    is already running or ended was delivered twice, and a missing one has expired.
    try:
        store.transition(
            job_id, allowed=(JobStatus.queued,), to=JobStatus.running, count_attempt=True, started_at=repr(time.time())
        )
    except JobNotFound:
        log.warning("job %s not found (expired before it ran); dropping its message", job_id)
        return "missing"
    except JobConflict:
        status = store.status(job_id)
        log.info("job %s is %s; not running it", job_id, status.value if status else "gone")
        return status.value if status else "missing"
    record = store.get(job_id)

    # 2. Describe it to the engine. A cancel shows up as a status change between steps.
    request = EngineRequest(
        job_id=job_id,
        model=record["model"],
        input=json.loads(record["input"]),
        should_stop=lambda: store.status(job_id) is JobStatus.canceled,
    )

    # 3. Run it. Each kind of failure becomes the job's error; none escapes to Celery, which
    #    would only log it.
    try:
        output = runtime.engine.run(request)
    except JobCanceled:
        log.info("job %s canceled while running", job_id)
        return JobStatus.canceled.value
    except RequestError as error:
        return _fail(store, job_id, kind="request", message=str(error))
    except WorkerFault as error:
        log.error("worker fault on job %s: %s", job_id, error)
        return _fail(store, job_id, kind="worker_fault", message=str(error))
    except Exception as error:  # an engine bug must still end the job, with its reason
        log.exception("job %s failed unexpectedly", job_id)
        return _fail(store, job_id, kind="internal", message=f"{type(error).__name__}: {error}")

    # 4. Store what it made and record success. A cancel that landed first wins.
    output = _store_artifacts(output, runtime.artifacts)
    try:
        store.transition(
            job_id,
            allowed=(JobStatus.running,),
            to=JobStatus.succeeded,
            output=json.dumps(output, separators=(",", ":")),
            completed_at=repr(time.time()),
            batch_size=1,
        )
    except JobConflict:
        return JobStatus.canceled.value
    return JobStatus.succeeded.value


def _fail(store: JobStore, job_id: str, *, kind: str, message: str) -> str:
    try:
        store.transition(
            job_id,
            allowed=(JobStatus.running,),
            to=JobStatus.failed,
            error=json.dumps({"type": kind, "message": message}),
            completed_at=repr(time.time()),
        )
    except JobConflict:
        return JobStatus.canceled.value
    return JobStatus.failed.value


def _store_artifacts(value: Any, artifacts: ArtifactStore) -> Any:
    """The output with each ``Artifact`` stored and replaced by its URL and digest."""
    if isinstance(value, Artifact):
        key = artifacts.put(value.data, value.extension)
        return {
            "url": artifact_url(key),
            "content_type": value.content_type,
            **value.meta,
            "sha256": key.split(".", 1)[0],
        }
    if isinstance(value, dict):
        return {k: _store_artifacts(v, artifacts) for k, v in value.items()}
    if isinstance(value, list):
        return [_store_artifacts(v, artifacts) for v in value]
    return value
