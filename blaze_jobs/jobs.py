"""The job: its status, the requests that create one, and the record clients see.

The request models are the public contract of ``POST /v1/jobs``; every field is documented
because FastAPI turns these docstrings and descriptions into the OpenAPI page at ``/docs``.
Each engine's ``input`` is its spec's input model (``blaze_jobs/engines/``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, create_model

from blaze_jobs.engines import SPECS
from blaze_jobs.engines.spec import EngineSpec

if TYPE_CHECKING:  # artifacts imports keys, which imports this module
    from blaze_jobs.artifacts import UrlSigner


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def ended(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


# --- what a client sends ----------------------------------------------------------------

WebhookEvent = Literal["started", "progress", "completed"]


def _default_webhook_events() -> list[WebhookEvent]:
    return ["started", "completed"]


class _JobCreateBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model id or path; the engine's default when absent.")
    cache: Literal["use", "bypass"] = Field(
        "use",
        description="`use`: a deterministic request (seed given) computed before answers at once from the "
        "cache; `bypass`: always compute.",
    )
    webhook: HttpUrl | None = Field(
        None,
        description="An http(s) URL that receives the job's events as signed POSTs (Standard Webhooks). "
        "It must resolve to a public address.",
    )
    webhook_events_filter: list[WebhookEvent] = Field(
        default_factory=_default_webhook_events,
        min_length=1,
        description="Which events the webhook receives; `progress` comes at most twice a second.",
    )


def create_model_name(spec: EngineSpec) -> str:
    """The name of ``spec``'s create body (``DiffusionInput`` gives ``DiffusionJobCreate``)."""
    return spec.input_model.__name__.removesuffix("Input") + "JobCreate"


def job_create_model(specs: Sequence[EngineSpec]) -> Any:
    """The body of ``POST /v1/jobs`` for these engines: one model per engine (``DiffusionInput``
    gives ``DiffusionJobCreate``), told apart by ``engine``."""
    models = []
    for spec in specs:
        input_field = Field(default_factory=spec.input_model) if spec.input_optional else Field()
        models.append(
            create_model(
                create_model_name(spec),
                __base__=_JobCreateBase,
                __doc__=spec.description,
                engine=(Literal[spec.name], Field(description="Which engine runs the job.")),  # type: ignore[arg-type]
                input=(spec.input_model, input_field),
            )
        )
    return Annotated[Union[tuple(models)], Field(discriminator="engine")]  # noqa: UP007  # a union built at run time


#: A create request of any registered engine.
JobCreate = job_create_model(SPECS)


# --- what a client reads ----------------------------------------------------------------


class JobError(BaseModel):
    type: str = Field(description="`request` (the input was at fault), `worker_fault` or `internal`.")
    message: str


class JobMetrics(BaseModel):
    queue_time_s: float | None = Field(None, description="From creation to the start of the run.")
    run_time_s: float | None = Field(None, description="From the start of the run to its end.")
    batch_size: int | None = Field(None, description="How many jobs ran together in the job's batch.")
    cache_hit: bool = Field(False, description="The output came from the cache; no device computed it.")


class JobUrls(BaseModel):
    get: str
    cancel: str
    events: str = Field(description="The job's server-sent events.")


class JobProgress(BaseModel):
    step: int = Field(description="Steps done, e.g. denoising steps.")
    total: int = Field(description="Steps the job takes in all.")


class Job(BaseModel):
    """A job as clients see it."""

    id: str = Field(description="Job id; also the Celery task id, so Flower shows the same id.")
    engine: str
    model: str
    status: JobStatus
    input: dict[str, Any]
    output: dict[str, Any] | None = Field(
        None, description="The result once succeeded; images are `{url, content_type, width, height, seed, sha256}`."
    )
    error: JobError | None = None
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    attempts: int = Field(0, description="How many times a worker started the job.")
    worker: str | None = Field(None, description="The worker that ran (or runs) the job's latest attempt.")
    progress: JobProgress | None = Field(None, description="How far a running job is, reported at most twice a second.")
    webhook: str | None = Field(None, description="Where the job's events are POSTed.")
    webhook_events_filter: list[str] | None = Field(None, description="Which events the webhook receives.")
    metrics: JobMetrics
    urls: JobUrls


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")


# --- the record in Redis ----------------------------------------------------------------
# A job is one Redis hash of flat string fields; structured fields hold JSON. Times are
# Unix seconds as strings, so Lua and Python agree on them without parsing.

JSON_FIELDS = ("input", "output", "error")


def new_record(*, job_id: str, tenant: str, engine: str, model: str, input: dict[str, Any], created_at: float) -> dict[str, str]:
    """The hash fields of a job just accepted, for ``tenant`` (its creator's key's)."""
    return {
        "id": job_id,
        "tenant": tenant,
        "engine": engine,
        "model": model,
        "status": JobStatus.queued.value,
        "input": json.dumps(input, separators=(",", ":")),
        "created_at": repr(created_at),
        "attempts": "0",
    }


def _time(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), tz=timezone.utc) if value else None


def _elapsed(start: str | None, end: str | None) -> float | None:
    return round(float(end) - float(start), 6) if start and end else None


def job_view(record: dict[str, str], *, base_url: str, signer: UrlSigner) -> dict[str, Any]:
    """The JSON a client sees for a stored record. ``base_url`` makes URLs absolute;
    ``signer`` signs its artifact URLs until the job expires, so they need no key."""
    job_url = f"{base_url}/v1/jobs/{record['id']}"
    output = json.loads(record["output"]) if record.get("output") else None
    if output:
        _absolute_urls(output, base_url, signer, signer.expiry(record))
    return {
        "id": record["id"],
        "engine": record["engine"],
        "model": record["model"],
        "status": record["status"],
        "input": json.loads(record["input"]),
        "output": output,
        "error": json.loads(record["error"]) if record.get("error") else None,
        "created_at": datetime.fromtimestamp(float(record["created_at"]), tz=timezone.utc).isoformat(),
        "started_at": _iso(record.get("started_at")),
        "completed_at": _iso(record.get("completed_at")),
        "attempts": int(record.get("attempts") or 0),
        "worker": record.get("worker"),
        "progress": json.loads(record["progress"]) if record.get("progress") else None,
        "webhook": record.get("webhook"),
        "webhook_events_filter": record.get("webhook_events", "").split(",") if record.get("webhook") else None,
        "metrics": {
            "queue_time_s": _elapsed(record["created_at"], record.get("started_at")),
            "run_time_s": _elapsed(record.get("started_at"), record.get("completed_at")),
            "batch_size": int(record["batch_size"]) if record.get("batch_size") else None,
            "cache_hit": record.get("cache_hit") == "1",
        },
        "urls": {"get": job_url, "cancel": f"{job_url}/cancel", "events": f"{job_url}/events"},
    }


def _iso(value: str | None) -> str | None:
    moment = _time(value)
    return moment.isoformat() if moment else None


def _absolute_urls(value: Any, base_url: str, signer: UrlSigner, expires: int) -> None:
    # Workers store artifact URLs as paths, since they cannot know where the API is reached
    # (and the cache shares them between jobs); each view signs its own.
    if isinstance(value, dict):
        url = value.get("url")
        if isinstance(url, str) and url.startswith("/"):
            value["url"] = base_url + (signer.sign_path(url, expires) or url)
        for item in value.values():
            _absolute_urls(item, base_url, signer, expires)
    elif isinstance(value, list):
        for item in value:
            _absolute_urls(item, base_url, signer, expires)
