"""One attempt of a started job: how it ends (succeeded, failed, queued again, let go), each
end one atomic step of the job store guarded by the attempt's number and lease."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from blaze_jobs.broker import requeue_push
from blaze_jobs.errors import JobConflict, JobNotFound
from blaze_jobs.jobs import JobStatus
from blaze_jobs.store import lease_owner

if TYPE_CHECKING:
    from blaze_jobs.worker_context import WorkerContext

log = logging.getLogger("blaze_jobs.worker")


class Attempt:
    """One attempt of a started job on this worker, and the ways it ends: each one atomic step
    guarded by the attempt, so a worker whose lease was taken away can no longer change the job."""

    def __init__(self, context: WorkerContext, job_id: str, number: int, *, tenant: str) -> None:
        self.context = context
        self.store = context.store
        self.job_id = job_id
        self.number = number
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
        fields: dict[str, Any] = {} if count_attempt else {"set_attempts": self.number - 1}
        if self._end(JobStatus.queued, push=requeue_push(self.context.settings, record), **fields):
            log.warning("job %s queued again (attempt %d)", self.job_id, self.number)
            return JobStatus.queued.value
        return self._now()

    def _now(self) -> str:
        status = self.store.status(self.job_id)
        return status.value if status else "missing"
