"""Waiting on a job: long-poll (``GET /v1/jobs/{id}?wait=``, ``Prefer: wait=`` on create) and
its server-sent events (``GET /v1/jobs/{id}/events``, through ``sse-starlette``).

Waiting never polls and holds no Redis connection: a waiting request takes a feed of the
job's events from the process's one reader (``api/event_reader.py``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.exceptions
from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from blaze_jobs import events, metrics
from blaze_jobs.artifacts import UrlSigner
from blaze_jobs.errors import JobNotFound
from blaze_jobs.events import event_order
from blaze_jobs.jobs import job_view
from blaze_jobs.records import tenant_of
from blaze_jobs.settings import Settings

from . import event_reader
from .artifacts import signer_of
from .auth import Caller
from .connections import Busy
from .event_reader import EventReader, TooManyWaiters
from .problems import PROBLEM_JSON, PROBLEM_SCHEMA, InputProblem
from .request_context import base_url, raw_header, settings_of
from .responses import dumps

EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
PROBLEM = {"content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}, "description": "A problem+json body naming the fault."}
#: Each line of the stream ends with a bare newline, as the stream always has (sse-starlette's
#: default is CRLF; both are valid server-sent events).
LINE_END = "\n"

# The reader every waiter shares, long-polls included, runs as long as the app does.
router = APIRouter(lifespan=event_reader.lifespan)


# --- long-poll ----------------------------------------------------------------------------


def preferred_wait(prefer: str | None, *, bound: float) -> float:
    """Seconds a ``Prefer: wait=N`` header (RFC 7240) asks for, within ``bound``; 0 without one."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";", 1)[0].strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                return max(0.0, min(float(value.strip().strip('"')), bound))
            except ValueError:
                return 0.0
    return 0.0


async def wait_if_preferred(request: Request, record: dict[str, str]) -> dict[str, str]:
    """After ``POST /v1/jobs``: the job once it ended, when the client sent ``Prefer: wait=N``
    and it ended within N seconds; otherwise the job as created."""
    prefer = raw_header(request, b"prefer")
    if prefer is None:
        return record
    seconds = preferred_wait(prefer.decode("latin-1"), bound=settings_of(request.app).max_wait_s)
    if seconds <= 0 or events.ended(record):
        return record
    try:
        # This request has just created the job, queued: it made no event yet, so its events
        # are read from the stream's start, with no read of the job.
        tenant = tenant_of(record.get("tenant"), settings_of(request.app))
        return await wait_for_end(request.app, record["id"], seconds, tenant=tenant, known=(record, "0-0"))
    except (Busy, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        # The job is stored and queued: a 503 now would tell the client to create it again.
        # A wait is a preference (RFC 7240), so answer the job as accepted instead.
        return record


def owned(record: dict[str, str], job_id: str, *, tenant: str, settings: Settings) -> dict[str, str]:
    """The job's record if it is ``tenant``'s; JobNotFound for a missing job and, the same
    answer, for another tenant's (a 404 never tells that a job exists)."""
    if not record or tenant_of(record.get("tenant"), settings) != tenant:
        raise JobNotFound(job_id)
    return record


async def job_after_wait(request: Request, job_id: str, wait: float, *, tenant: str) -> dict[str, str]:
    """``GET /v1/jobs/{id}?wait=N``: ``tenant``'s job as soon as it ends, or as it stands after
    N seconds."""
    settings = settings_of(request.app)
    if wait > settings.max_wait_s:
        raise InputProblem("wait", f"must be at most {settings.max_wait_s:g} seconds")
    if wait <= 0:
        return owned(await request.app.state.store.get(job_id), job_id, tenant=tenant, settings=settings)
    return await wait_for_end(request.app, job_id, wait, tenant=tenant)


async def wait_for_end(
    app: FastAPI, job_id: str, seconds: float, *, tenant: str, known: tuple[dict[str, str], str] | None = None
) -> dict[str, str]:
    """``tenant``'s job once it ended, or as it stands after ``seconds``. ``known``: the job
    and the id of its latest event, when the caller has them (else they are read)."""
    if known is None:
        settings = settings_of(app)
        known = await events.job_and_position(app.state.store.redis, prefix=settings.redis_prefix, job_id=job_id)
        owned(known[0], job_id, tenant=tenant, settings=settings)
    record, position = known
    if not record:
        raise JobNotFound(job_id)
    if events.ended(record):
        return record  # nothing to watch
    deadline = time.monotonic() + seconds
    reader: EventReader = app.state.reader
    async with reader.watch(job_id, after=position) as feed, open_stream("long_poll"):
        while not events.ended(record):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for event in await feed.next_events(left):
                record = events.apply(record, event)
    return record


@asynccontextmanager
async def open_stream(kind: str) -> AsyncIterator[None]:
    """Count a client waiting on a job, by ``kind`` (sse, long_poll), while it waits."""
    if not metrics.enabled():
        yield
        return
    gauge = metrics.STREAMS_OPEN.labels(kind)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


# --- server-sent events -------------------------------------------------------------------


def sse(event_id: str, kind: str, data: Any) -> ServerSentEvent:
    # Encoded as the JSON answers are, so that a stored record JSON cannot carry still streams.
    return ServerSentEvent(dumps(data).decode(), id=event_id, event=kind, sep=LINE_END)


def event_data(event: events.JobEvent, record: dict[str, str], *, base: str, signer: UrlSigner) -> Any:
    """What an SSE event carries: at a status change the job (``record`` is the job before
    it), with progress its ``{step, total}``, otherwise the event's fields."""
    if event.record is not None:
        return job_view(record, base_url=base, signer=signer)
    if event.type == "job.progress":
        return json.loads(event.fields["progress"])
    return event.fields


@router.get(
    "/v1/jobs/{job_id}/events",
    # The documented answer; the route returns sse-starlette's EventSourceResponse.
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "An event stream."}, 404: PROBLEM},
)
async def job_events(
    request: Request,
    caller: Caller,
    job_id: str,
    last_event_id: Annotated[str | None, Header(description="Resume after this event id.")] = None,
) -> EventSourceResponse:
    """The job's events as server-sent events, ending with the final job.

    The first event, `job`, is the job as it stands; then `job.started`, `job.progress`
    (`{step, total}`), `job.queued` (handed back to the queue after a worker fault) and
    `job.completed` (the final job), each with its event id. A client that reconnects with
    `Last-Event-ID` gets every event after that one and no `job` event; `Last-Event-ID: 0-0`
    replays the whole stream."""
    app, settings = request.app, settings_of(request.app)
    record, position = await stream_start(app, job_id, tenant=caller.tenant)
    resume = last_event_id.strip() if last_event_id and EVENT_ID.match(last_event_id.strip()) else None
    stream = _event_stream(
        app.state.reader,
        job_id,
        record=record,
        position=position,
        resume=resume,
        base=base_url(request),
        signer=signer_of(request),
    )
    return event_stream_response(stream, settings)


def event_stream_response(stream: AsyncIterator[ServerSentEvent], settings: Settings) -> EventSourceResponse:
    """An event stream's answer: uncached, with a keep-alive comment every
    ``event_keep_alive_s`` (under the 30 s read timeouts of common clients and proxies)."""
    return EventSourceResponse(
        stream,
        headers={"Cache-Control": "no-cache"},
        sep=LINE_END,
        ping=settings.event_keep_alive_s,
        ping_message_factory=keep_alive,
    )


async def stream_start(app: FastAPI, job_id: str, *, tenant: str) -> tuple[dict[str, str], str]:
    """Before an event stream of ``tenant``'s job answers 200: the job and the id of its latest
    event; JobNotFound for a job the tenant may not see, and 503 busy past the waiter bound
    (now, rather than after the 200 has gone out; the stream's watch checks again, since
    another may take the last place meanwhile)."""
    settings = settings_of(app)
    record, position = await events.job_and_position(app.state.store.redis, prefix=settings.redis_prefix, job_id=job_id)
    owned(record, job_id, tenant=tenant, settings=settings)
    if app.state.reader.waiters >= settings.max_waiters:
        raise TooManyWaiters(settings.max_waiters)
    return record, position


async def follow(
    reader: EventReader, job_id: str, *, record: dict[str, str], after: str
) -> AsyncIterator[tuple[dict[str, str], events.JobEvent]]:
    """Each event of the job after ``after``, as it comes, with the job as it stands after it,
    up to and including ``job.completed``. The caller's response sends the keep-alives
    (sse-starlette's ``ping``) and notices a client that went away."""
    async with reader.watch(job_id, after=after) as feed, open_stream("sse"):
        while True:
            # The timeout only bounds each wait.
            for event in await feed.next_events(reader.settings.event_keep_alive_s):
                record = events.apply(record, event)
                yield record, event
                if event.type == events.COMPLETED:
                    return


def keep_alive() -> ServerSentEvent:
    return ServerSentEvent(comment="keep-alive", sep=LINE_END)


async def _event_stream(
    reader: EventReader,
    job_id: str,
    *,
    record: dict[str, str],
    position: str,
    resume: str | None,
    base: str,
    signer: UrlSigner,
) -> AsyncIterator[ServerSentEvent]:
    # A client that loses the stream reconnects after a second (with Last-Event-ID).
    yield ServerSentEvent(retry=1000, sep=LINE_END)
    if resume is None:
        yield sse(position, "job", job_view(record, base_url=base, signer=signer))
        after = position
    else:
        after = resume
    # A client that has seen the end of an ended job has nothing left to get.
    if events.ended(record) and event_order(after) >= event_order(position):
        return
    async for now, event in follow(reader, job_id, record=record, after=after):
        yield sse(event.id, event.type, event_data(event, now, base=base, signer=signer))
