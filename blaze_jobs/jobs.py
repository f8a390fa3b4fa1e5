"""The job: its status, the requests that create one, and the record clients see.

The request models are the public contract of ``POST /v1/jobs``; every field is documented
because FastAPI turns these docstrings and descriptions into the OpenAPI page at ``/docs``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, HttpUrl, model_validator


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


def _integral(value: Any) -> Any:
    # JSON has one kind of number, and JSON Schema calls 5.0 an integer; strict mode, which
    # keeps "64" from passing as a width, would refuse 5.0 too.
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: An integer as JSON may write it: `5` or `5.0`, never `5.5` or `"5"`.
JSONInt = Annotated[int, BeforeValidator(_integral)]
#: The same or null. (`JSONInt | None` would hide the field's bounds from its JSON Schema.)
OptionalJSONInt = Annotated[int | None, BeforeValidator(_integral)]


class DiffusionInput(BaseModel):
    """Input of an image job. Bounds beyond the ones shown are deployment settings
    (``BLAZE_MAX_WIDTH``, ``BLAZE_MAX_PIXELS``, ``BLAZE_MAX_STEPS`` …)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="What the image should show.")
    negative_prompt: str | None = Field(None, description="What the image should avoid.")
    width: OptionalJSONInt = Field(
        None, ge=8, multiple_of=8, description="Width in pixels, a multiple of 8. Defaults to the model's own size."
    )
    height: OptionalJSONInt = Field(
        None, ge=8, multiple_of=8, description="Height in pixels, a multiple of 8. Defaults to the model's own size."
    )
    num_inference_steps: JSONInt = Field(20, ge=1, description="Denoising steps; more is slower and finer.")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="How strongly the image follows the prompt.")
    seed: OptionalJSONInt = Field(
        None,
        ge=0,
        le=2**32 - 1,
        description="Random seed. The same seed and input give the same image bytes. "
        "Drawn at random (and reported in the output) when absent.",
    )
    num_outputs: JSONInt = Field(1, ge=1, description="How many images; image i uses seed + i.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Encoding of the images.")


class EchoInput(BaseModel):
    """Input of an echo job: any fields, returned unchanged as the output. For smoke tests
    and benchmarks of the queue itself."""

    model_config = ConfigDict(extra="allow", strict=True)

    sleep_ms: JSONInt = Field(0, ge=0, description="Wait this long before answering (bounded by BLAZE_MAX_SLEEP_MS).")


class ChatMessage(BaseModel):
    """One turn of a chat."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="What they say.")


class LLMInput(BaseModel):
    """Input of a text job: a `prompt` to continue, or chat `messages` to answer (exactly one).
    Bounds beyond the ones shown are deployment settings (``BLAZE_LLM_MAX_NEW_TOKENS``,
    ``BLAZE_LLM_MAX_PROMPT_CHARS``, ``BLAZE_LLM_MAX_MESSAGES``, ``BLAZE_LLM_MAX_STOP`` …)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        # The schema says what the validator below checks: a prompt or messages, not both.
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        },
    )

    prompt: str | None = Field(None, min_length=1, description="Text for the model to continue.")
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        description="A chat, rendered with the model's chat template; the model writes the assistant's next turn.",
    )
    max_new_tokens: JSONInt = Field(128, ge=1, description="Most tokens to generate.")
    temperature: float = Field(
        1.0, ge=0, le=2, description="Sampling temperature; 0 takes the likeliest token every time (greedy)."
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: draw from the likeliest tokens whose probabilities add up to this."
    )
    seed: OptionalJSONInt = Field(
        None,
        ge=0,
        le=2**32 - 1,
        description="Random seed for sampling. The same seed and input give the same text alone (and the cached "
        "text on a repeat); beside other jobs, the same text except where a draw falls within the rounding of "
        "batched kernels of another token. Drawn at random (and reported in the output) when absent.",
    )
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="Generation ends where the first of these strings appears; it is not part of the text."
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "LLMInput":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


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
    webhook_events_filter: list[Literal["started", "progress", "completed"]] = Field(
        default_factory=lambda: ["started", "completed"],
        min_length=1,
        description="Which events the webhook receives; `progress` comes at most twice a second.",
    )


class DiffusionJobCreate(_JobCreateBase):
    """An image job, run by a diffusers pipeline."""

    engine: Literal["diffusion"] = Field(description="Which engine runs the job.")
    input: DiffusionInput


class EchoJobCreate(_JobCreateBase):
    """An echo job: the output is the input."""

    engine: Literal["echo"] = Field(description="Which engine runs the job.")
    input: EchoInput = Field(default_factory=EchoInput)


class LLMJobCreate(_JobCreateBase):
    """A text job, run by a transformers causal language model. The output is `{text,
    finish_reason, usage: {prompt_tokens, completion_tokens}}`, with `seed` when sampling;
    `finish_reason` is `stop` (end of sequence or a stop string), `length` or `canceled`."""

    engine: Literal["llm"] = Field(description="Which engine runs the job.")
    input: LLMInput


JobCreate = Annotated[Union[DiffusionJobCreate, EchoJobCreate, LLMJobCreate], Field(discriminator="engine")]


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


def new_record(*, job_id: str, engine: str, model: str, input: dict[str, Any], created_at: float) -> dict[str, str]:
    """The hash fields of a job just accepted."""
    return {
        "id": job_id,
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


def job_view(record: dict[str, str], *, base_url: str) -> dict[str, Any]:
    """The JSON a client sees for a stored record. ``base_url`` makes URLs absolute."""
    job_url = f"{base_url}/v1/jobs/{record['id']}"
    output = json.loads(record["output"]) if record.get("output") else None
    if output:
        _absolute_urls(output, base_url)
    return {
        "id": record["id"],
        "engine": record["engine"],
        "model": record["model"],
        "status": record["status"],
        "input": json.loads(record["input"]),
        "output": output,
        "error": json.loads(record["error"]) if record.get("error") else None,
        "created_at": _time(record["created_at"]).isoformat(),
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


def _absolute_urls(value: Any, base_url: str) -> None:
    # Workers store artifact URLs as paths, since they cannot know where the API is reached.
    if isinstance(value, dict):
        url = value.get("url")
        if isinstance(url, str) and url.startswith("/"):
            value["url"] = base_url + url
        for item in value.values():
            _absolute_urls(item, base_url)
    elif isinstance(value, list):
        for item in value:
            _absolute_urls(item, base_url)
