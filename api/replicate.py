"""Replicate's predictions API, so that Replicate's own client works against this deployment
with only its base URL and key changed: predictions (create, get, list, cancel, stream), the
models ``blaze/<engine>`` and their versions. A prediction is a Blaze job, made by the one
create path (``creation.create``); its JSON is ``blaze_jobs.predictions``'. Errors stay
problem+json, whose ``title``, ``detail`` and ``status`` the client's ``ReplicateError``
reads."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import redis.exceptions
from fastapi import APIRouter, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException

from blaze_jobs import audit, events
from blaze_jobs.artifacts import UrlSigner
from blaze_jobs.errors import JobConflict
from blaze_jobs.jobs import JobCreate
from blaze_jobs.predictions import (
    OWNER,
    SURFACE,
    blaze_events,
    final_pieces,
    model_view,
    prediction_view,
    progress_log,
    resolve_version,
    version_id,
    version_view,
)
from blaze_jobs.records import CURSOR
from blaze_jobs.settings import ENGINES
from blaze_jobs.store import AsyncJobStore

from . import bounds, creation, waits
from .artifacts import signer_of
from .auth import Caller
from .connections import Busy
from .event_reader import EventReader
from .problems import PROBLEM_JSON, PROBLEM_SCHEMA, InputProblem
from .request_context import base_url, raw_header, settings_of
from .responses import JSONResponse

log = logging.getLogger("blaze_jobs.api.replicate")
PROBLEM = {"content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}, "description": "A problem+json body naming the fault."}
# Bodies read as POST /v1/jobs reads them: bad JSON is a 422 naming the body, never a 400.
router = APIRouter(route_class=bounds.JSONBodyRoute, tags=["Replicate"])

#: How long Replicate holds a create sent with a bare ``Prefer: wait``.
REPLICATE_WAIT_S = 60.0
#: Replicate's page of predictions.
PAGE_SIZE = 100
JOB_CREATE: TypeAdapter[Any] = TypeAdapter(JobCreate)
ReplicateEvent = Literal["start", "output", "logs", "completed"]


class ModelPredictionCreate(BaseModel):
    """A prediction of a model, ``blaze/<engine>``: a job of that engine's default model."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any] = Field(default_factory=dict, description="The engine's input (its version's `Input` schema).")
    webhook: str | None = Field(None, description="An http(s) URL that receives the prediction as signed POSTs.")
    webhook_completed: str | None = Field(None, description="Older form of `webhook` with `webhook_events_filter: [completed]`.")
    webhook_events_filter: list[ReplicateEvent] | None = Field(
        None,
        min_length=1,
        description="When the webhook is sent: `start`, `output` (sent with the final output), `logs` "
        "(progress, at most twice a second), `completed`. By default `output` and `completed`.",
    )
    stream: bool | None = Field(None, description="Accepted for Replicate's clients: every prediction has `urls.stream`.")


class PredictionCreate(ModelPredictionCreate):
    """A prediction of a version: an engine and one of its models."""

    version: str = Field(
        description="A version id (`GET /v1/models/blaze/{engine}/versions`), `blaze/<engine>` or `blaze/<engine>:<id>`."
    )


# --- predictions --------------------------------------------------------------------------


@router.post("/v1/predictions", status_code=201, responses={404: PROBLEM, 409: PROBLEM, 429: PROBLEM})
async def create_prediction(request: Request, caller: Caller, body: PredictionCreate) -> JSONResponse:
    """Create a prediction of a version. With `Prefer: wait` (or `wait=N`), answer once it ends
    or when the wait runs out, then with status `starting`."""
    found = resolve_version(body.version, settings_of(request.app))
    if found is None:
        raise InputProblem("version", f"no version {body.version!r} here; GET /v1/models/{OWNER}/{{engine}}/versions lists them")
    return await _create(request, caller, body, *found)


@router.post("/v1/models/blaze/{name}/predictions", status_code=201, responses={404: PROBLEM, 409: PROBLEM, 429: PROBLEM})
async def create_model_prediction(request: Request, caller: Caller, name: str, body: ModelPredictionCreate) -> JSONResponse:
    """Create a prediction of `blaze/<engine>`'s latest version (the engine's default model)."""
    engine = _engine(name)
    return await _create(request, caller, body, engine, settings_of(request.app).default_model(engine))


@router.get("/v1/predictions")
async def list_predictions(
    request: Request,
    caller: Caller,
    cursor: Annotated[str | None, Query(pattern=CURSOR.pattern, description="From the previous page's `next`.")] = None,
    limit: int | None = Query(None, ge=1, description="Page size (100 by default, at most BLAZE_LIST_LIMIT_MAX)."),
) -> JSONResponse:
    """The caller's tenant's predictions (every job), newest first: `{results, next, previous}`."""
    settings = settings_of(request.app)
    size = min(limit or PAGE_SIZE, settings.list_limit_max)
    store: AsyncJobStore = request.app.state.store
    records, next_cursor = await store.list(tenant=caller.tenant, status=None, engine=None, limit=size, cursor=cursor)
    root, signer = base_url(request), signer_of(request)
    following = None
    if next_cursor is not None:
        following = f"{root}/v1/predictions?cursor={next_cursor}" + (f"&limit={limit}" if limit else "")
    results = [prediction_view(r, base_url=root, signer=signer) for r in records]
    # No `previous`: the job index pages forward only.
    return JSONResponse({"results": results, "next": following, "previous": None})


@router.get("/v1/predictions/{prediction_id}", responses={404: PROBLEM})
async def get_prediction(request: Request, caller: Caller, prediction_id: str) -> JSONResponse:
    """The prediction as it stands."""
    record = await request.app.state.store.get(prediction_id)
    waits.owned(record, prediction_id, tenant=caller.tenant, settings=settings_of(request.app))
    return JSONResponse(prediction_view(record, base_url=base_url(request), signer=signer_of(request)))


@router.post("/v1/predictions/{prediction_id}/cancel", responses={404: PROBLEM})
async def cancel_prediction(request: Request, caller: Caller, prediction_id: str) -> JSONResponse:
    """Cancel a prediction that is starting or processing; one that ended is answered as it is."""
    store: AsyncJobStore = request.app.state.store
    try:
        await store.cancel(prediction_id, tenant=caller.tenant)
    except JobConflict:
        pass  # ended already: Replicate answers the prediction, not a conflict
    else:
        address = request.client.host if request.client else None
        try:
            await audit.record_async(
                store.redis, settings_of(request.app), key=caller, action="job.cancel", target=prediction_id, address=address
            )
        except redis.exceptions.RedisError as error:
            # The job is canceled already (as in POST /v1/jobs/{id}/cancel).
            log.error("job %s canceled by key %s, but its audit entry was not written: %s", prediction_id, caller.id, error)
    record = await store.get(prediction_id)
    return JSONResponse(prediction_view(record, base_url=base_url(request), signer=signer_of(request)))


@router.get(
    "/v1/predictions/{prediction_id}/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "An event stream."}, 404: PROBLEM},
)
async def stream_prediction(
    request: Request,
    caller: Caller,
    prediction_id: str,
    last_event_id: Annotated[str | None, Header(description="Resume after this event id.")] = None,
) -> EventSourceResponse:
    """The prediction's output as Replicate streams it: `output` events (each piece of text
    as it is made; an image's URL, or another engine's output as JSON, at the end), `logs`
    (progress), `error` if it fails and `done` (`{}`, or `{"reason": "canceled"}`), each
    with an id. From its start, or after `Last-Event-ID`."""
    app, settings = request.app, settings_of(request.app)
    record, _ = await waits.stream_start(app, prediction_id, tenant=caller.tenant)
    resume = last_event_id.strip() if last_event_id and waits.EVENT_ID.match(last_event_id.strip()) else None
    stream = _prediction_events(
        app.state.reader, prediction_id, record=record, after=resume or "0-0", base=base_url(request), signer=signer_of(request)
    )
    return waits.event_stream_response(stream, settings)


# --- models and versions ------------------------------------------------------------------


@router.get("/v1/models/blaze/{name}", responses={404: PROBLEM})
async def get_model(request: Request, caller: Caller, name: str) -> JSONResponse:
    """The model `blaze/<engine>`; its `latest_version` is the engine's default model."""
    engine = _engine(name)
    return JSONResponse(model_view(engine, settings_of(request.app), base_url=base_url(request)))


@router.get("/v1/models/blaze/{name}/versions", responses={404: PROBLEM})
async def list_versions(request: Request, caller: Caller, name: str) -> JSONResponse:
    """One version per model the engine may run here, the default first."""
    engine = _engine(name)
    results = [version_view(engine, model) for model in settings_of(request.app).allowed_models(engine)]
    return JSONResponse({"results": results, "next": None, "previous": None})


@router.get("/v1/models/blaze/{name}/versions/{version}", responses={404: PROBLEM})
async def get_version(request: Request, caller: Caller, name: str, version: str) -> JSONResponse:
    """One version of `blaze/<engine>`."""
    engine = _engine(name)
    for model in settings_of(request.app).allowed_models(engine):
        if version_id(engine, model) == version:
            return JSONResponse(version_view(engine, model))
    raise HTTPException(404, f"{OWNER}/{engine} has no version {version!r}")


# --- the parts ----------------------------------------------------------------------------


def _engine(name: str) -> str:
    """The engine the model ``blaze/<name>`` is; a 404 for a name that is none."""
    if name not in ENGINES:
        raise HTTPException(404, f"no model {OWNER}/{name}; models here: {', '.join(f'{OWNER}/{e}' for e in ENGINES)}")
    return name


async def _create(request: Request, caller: Caller, body: ModelPredictionCreate, engine: str, model: str) -> JSONResponse:
    # 1. The Blaze job the prediction is, validated as POST /v1/jobs validates one, so a bad
    #    input is a 422 naming its field (`input.width`).
    webhook, wanted = body.webhook, body.webhook_events_filter
    if body.webhook_completed is not None:
        if webhook is not None and webhook != body.webhook_completed:
            raise InputProblem("webhook_completed", "a prediction has one webhook: give `webhook` or `webhook_completed`")
        webhook, wanted = body.webhook_completed, wanted or ["completed"]
    job: dict[str, Any] = {"engine": engine, "model": model, "input": body.input}
    if webhook is not None:
        job.update(webhook=webhook, webhook_events_filter=blaze_events(wanted))
    try:
        request_body = JOB_CREATE.validate_python(job)
    except ValidationError as invalid:
        raise RequestValidationError(invalid.errors()) from None
    # 2. Made by the one create path: bounds, tenant, quota, queue, cache, webhooks.
    record, created = await creation.create(request, caller, request_body, extra={"surface": SURFACE})
    # 3. With `Prefer: wait`, answered once it ends or the wait runs out.
    record, blocking = await _wait_if_preferred(request, record, tenant=caller.tenant)
    view = prediction_view(record, base_url=base_url(request), signer=signer_of(request), blocking=blocking)
    return JSONResponse(view, status_code=201 if created else 200, headers={"Location": view["urls"]["get"]})


def blocking_wait_s(prefer: str | None, *, bound: float) -> float:
    """Seconds a create's ``Prefer`` header asks it to wait: Replicate's 60 for a bare
    ``wait``, N for ``wait=N``, within ``bound``; 0 without one. A little less in practice:
    Replicate's client gives up reading N + 0.5 s after it sent the request, so the answer
    leaves a margin before that."""
    bare = any(p.split(";", 1)[0].strip().lower() == "wait" for p in (prefer or "").split(","))
    seconds = min(REPLICATE_WAIT_S, bound) if bare else waits.preferred_wait(prefer, bound=bound)
    return max(0.0, seconds - min(1.0, seconds / 4))


async def _wait_if_preferred(request: Request, record: dict[str, str], *, tenant: str) -> tuple[dict[str, str], bool]:
    """The job once it ended within the wait the create asked for, and whether the answer
    is a blocking create's that saw no end (which must say `starting`)."""
    prefer = raw_header(request, b"prefer")
    seconds = blocking_wait_s(prefer.decode("latin-1") if prefer else None, bound=settings_of(request.app).max_wait_s)
    if seconds <= 0 or events.ended(record):
        return record, False
    try:
        # Just created, so it made no event yet: its events are read from the stream's start.
        record = await waits.wait_for_end(request.app, record["id"], seconds, tenant=tenant, known=(record, "0-0"))
    except (Busy, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        # The job is stored and queued: answer it as accepted, and the client polls.
        pass
    return record, not events.ended(record)


async def _prediction_events(
    reader: EventReader, job_id: str, *, record: dict[str, str], after: str, base: str, signer: UrlSigner
) -> AsyncIterator[ServerSentEvent]:
    # The text sent since the latest attempt started, so the end sends only what is missing
    # (all of it, for a cached job that streamed nothing).
    streamed = ""
    async for now, event in waits.follow(reader, job_id, record=record, after=after):
        if event.type == "job.started":
            streamed = ""
        elif event.type == "job.delta" and event.fields.get("text"):
            streamed += event.fields["text"]
            yield _event(event.id, "output", event.fields["text"])
        elif event.type == "job.progress" and event.record is None:
            yield _event(event.id, "logs", progress_log(now.get("progress")))
        elif event.type == events.COMPLETED:
            view = prediction_view(now, base_url=base, signer=signer)
            for piece in final_pieces(now["engine"], view["output"], streamed=streamed):
                yield _event(event.id, "output", piece)
            if view["status"] == "failed":
                yield _event(event.id, "error", view["error"] or "failed")
            yield _event(event.id, "done", '{"reason":"canceled"}' if view["status"] == "canceled" else "{}")


def _event(event_id: str, kind: str, data: str) -> ServerSentEvent:
    return ServerSentEvent(data, id=event_id, event=kind, sep=waits.LINE_END)
