"""One attempt of a started job: how it ends (succeeded, failed, queued again, let go), each
end one atomic step of the job store guarded by the attempt's number and lease.

With metrics on, each attempt records its own queue wait as it starts (``started``: from the
job's creation, or from its last return to the queue, ``requeued_at``, to this start); an
attempt that ends its job counts it (``blaze_jobs_ended_total``) and records its run time
(from its start to the end); one queued again counts a retry, by reason: ``worker_fault``
(the attempt counts) or ``handed_back`` (the breaker opened or the worker stopped before it
reached the device).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from blaze_jobs import metrics
from blaze_jobs.broker import requeue_push
from blaze_jobs.errors import JobConflict, JobNotFound
from blaze_jobs.jobs import JobStatus
from blaze_jobs.records import lease_owner

if TYPE_CHECKING:
    from blaze_jobs.worker_context import WorkerContext

log = logging.getLogger("blaze_jobs.worker")


class Attempt:
    """One attempt of a started job on this worker, and the ways it ends: each one atomic step
    guarded by the attempt, so a worker whose lease was taken away can no longer change the job."""

    def __init__(self, context: WorkerContext, record: dict[str, str], number: int, *, tenant: str) -> None:
        self.context = context
        self.store = context.store
        self.job_id = job_id = record["id"]
        self.number = number
        self.model = record["model"]
        self.started_at = float(record["started_at"])
        # Since when this attempt waited: the job's creation, or its last return to the queue
        # (queued again by an attempt, or by the reaper).
        self.queued_at = float(record.get("requeued_at") or record["created_at"])
        self.tenant = tenant  # the job's: its end moves it between the tenant's indexes
        # The lease names this attempt: once the job was handed to another, its lease is not ours.
        self.lease = {"key": context.store.keys.lease(job_id), "owner": lease_owner(context.name, number)}

    def _end(self, to: JobStatus, **fields: Any) -> bool:
        try:
            self.store.transition(
                self.job_id,
                tenant=self.tenant,
                allowed=(JobStatus.running,),
                to=to,
                attempts=self.number,
                release=self.lease,
                **fields,
            )
        except (JobConflict, JobNotFound):
            self.release_lease()
            return False
        if to is not JobStatus.queued and metrics.enabled():
            self._ended(to, ended_at=float(fields["completed_at"]))
        return True

    def _ended(self, to: JobStatus, *, ended_at: float) -> None:
        engine = self.context.engine_name
        metrics.JOBS_ENDED.labels(engine, to.value).inc()
        metrics.JOB_RUN_SECONDS.labels(engine, self.model).observe(ended_at - self.started_at)

    def started(self) -> None:
        """Record this attempt's own queue wait (metrics on): a retried job's earlier attempts
        are not part of it."""
        if metrics.enabled():
            metrics.JOB_QUEUE_SECONDS.labels(self.context.engine_name, self.model).observe(self.started_at - self.queued_at)

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
        no client saw, so it is not stored, and the cancel's job.completed and the record agree.
        A job canceled while it ran ends here too."""
        self.release_lease()
        if metrics.enabled():
            self._ended(JobStatus.canceled, ended_at=time.time())
        return JobStatus.canceled.value

    def failed(self, kind: str, message: str) -> str:
        error = json.dumps({"type": kind, "message": message})
        return JobStatus.failed.value if self._end(JobStatus.failed, error=error, completed_at=repr(time.time())) else self._now()

    def requeue(self, *, count_attempt: bool) -> str:
        record = self.store.get(self.job_id)
        fields: dict[str, Any] = {"requeued_at": repr(time.time())}
        if not count_attempt:
            fields["set_attempts"] = self.number - 1
        if self._end(JobStatus.queued, push=requeue_push(self.context.settings, record), **fields):
            log.warning("job %s queued again (attempt %d)", self.job_id, self.number)
            if metrics.enabled():
                metrics.JOB_RETRIES.labels(self.context.engine_name, "worker_fault" if count_attempt else "handed_back").inc()
            return JobStatus.queued.value
        return self._now()

    def _now(self) -> str:
        status = self.store.status(self.job_id)
        return status.value if status else "missing"
