"""The Celery tasks: one per engine, each a thin call into ``blaze_jobs.worker``, and the
webhook delivery, a thin call into ``blaze_jobs.webhooks``."""

from __future__ import annotations

from blaze_jobs import webhooks
from blaze_jobs.broker import task_name
from blaze_jobs.celery_app import app
from blaze_jobs.events import DELIVER_TASK
from blaze_jobs.settings import ENGINES
from blaze_jobs.worker import run_job


def _task_for(engine: str) -> None:
    # ``summary`` is only there so Flower shows a short prompt beside the job id; ``tenant``
    # is the job's (absent from messages made before tenants: the default tenant's);
    # ``faulted_on`` and ``passes`` come with a job that met a worker fault (broker.py).
    @app.task(name=task_name(engine), acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def generate(
        job_id: str, summary: str = "", faulted_on: list[str] | None = None, passes: int = 0, tenant: str | None = None
    ) -> str:
        return run_job(job_id, engine=engine, tenant=tenant, faulted_on=faulted_on or [], passes=passes)


for _engine in ENGINES:
    _task_for(_engine)


@app.task(name=DELIVER_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_webhook(job_id: str, delivery_id: str) -> str:
    """One attempt at one webhook delivery (``blaze_jobs.webhooks``)."""
    return webhooks.deliver(job_id, delivery_id)
