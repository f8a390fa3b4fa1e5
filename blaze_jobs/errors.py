"""The errors Blaze Jobs raises on purpose."""


class BlazeError(Exception):
    """Base of every error Blaze Jobs raises on purpose."""


class RequestError(BlazeError):
    """The job's own request is at fault (bad input, unknown model): fails only that job."""


class WorkerFault(BlazeError):
    """The worker or its device is at fault (OOM, device error, load failure): the job may run elsewhere."""


class JobCanceled(BlazeError):
    """The job was canceled while it ran."""

    def __repr__(self) -> str:
        return f"JobCanceled({self.args[0]!r})" if self.args else "JobCanceled()"


class JobNotFound(BlazeError):
    """No job with this id is visible (never existed, or its retention ran out)."""


class JobConflict(BlazeError):
    """The job is in a state that forbids the operation (cancel after it ended)."""
