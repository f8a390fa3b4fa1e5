"""The errors Blaze Jobs raises on purpose."""

from __future__ import annotations

from typing import Any


class BlazeError(Exception):
    """Base of every error Blaze Jobs raises on purpose."""


class RequestError(BlazeError):
    """The job's own request is at fault (bad input, unknown model): fails only that job."""


class WorkerFault(BlazeError):
    """The worker or its device is at fault (OOM, device error, load failure): the job may run elsewhere."""


class HandedBack(WorkerFault):
    """The worker stopped taking work (its breaker opened, or it is shutting down) before the
    job reached the device: the job goes back to the queue, its attempt not counted."""


class JobCanceled(BlazeError):
    """The job was canceled while it ran."""

    def __repr__(self) -> str:
        return f"JobCanceled({self.args[0]!r})" if self.args else "JobCanceled()"


class JobNotFound(BlazeError):
    """No job with this id is visible (never existed, or its retention ran out)."""


class JobConflict(BlazeError):
    """The job is in a state that forbids the operation (cancel after it ended)."""


class APIError(BlazeError):
    """The API answered with an error: its HTTP ``status``, and the problem's ``title``,
    ``detail``, ``problem_id`` (the API's log has the cause under it) and ``errors``; or, for
    a body that is no problem (a proxy's error page), its start in ``body``."""

    def __init__(self, status: int, problem: dict[str, Any] | None = None, *, body: str = "") -> None:
        self.status = status
        self.problem: dict[str, Any] = problem or {}
        self.title = str(self.problem.get("title") or "")
        self.detail = str(self.problem.get("detail") or "")
        self.problem_id = str(self.problem.get("id") or "")
        self.errors: list[dict[str, Any]] = list(self.problem.get("errors") or [])
        self.body = body
        said = [part for part in (self.title, self.detail if self.detail != self.title else "", body) if part]
        super().__init__(f"HTTP {status}: {': '.join(said)}" + (f" (problem id {self.problem_id})" if self.problem_id else ""))


class APIConnectionError(BlazeError, ConnectionError):
    """The API could not be reached, or the connection to it failed (refused, reset, timed out)."""


class WaitTimeout(BlazeError, TimeoutError):
    """The job had not ended when ``wait`` gave up; ``job`` is the job as last seen."""

    def __init__(self, job_id: str, job: dict[str, Any], timeout: float) -> None:
        super().__init__(f"job {job_id} still {job.get('status')} after {timeout:g} s")
        self.job_id = job_id
        self.job = job


class RedisMisconfigured(BlazeError):
    """Redis is set up so that it would lose accepted jobs (it evicts); the message says what to set."""


class QuotaExceeded(BlazeError):
    """The tenant already has as many jobs queued and running as its key allows."""

    def __init__(self, tenant: str, *, count: int, limit: int) -> None:
        super().__init__(f"tenant {tenant} has {count} jobs queued or running, its quota is {limit}")
        self.tenant, self.count, self.limit = tenant, count, limit


class QueueFull(BlazeError):
    """The engine's queue holds as many jobs as the deployment allows (``BLAZE_QUEUE_MAX``)."""

    def __init__(self, engine: str, *, length: int, limit: int) -> None:
        super().__init__(f"the {engine} queue holds {length} jobs, its bound is {limit}")
        self.engine, self.length, self.limit = engine, length, limit


class ClaimTakenOver(BlazeError):
    """A create's ``Idempotency-Key`` claim was taken over by a retry (it looked stale): the
    create stored nothing, and the retry's job is the key's one job."""
