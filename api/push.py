"""Results pushed to clients: long-poll (``?wait=``, ``Prefer: wait=``), server-sent events,
webhook deliveries and the webhook signing secret.

Waiting never polls and holds no Redis connection: a waiting request takes a feed of the
job's events from the process's one reader (``api/waiting.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import socket
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator

import redis.exceptions
from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from api.problems import PROBLEM_JSON, PROBLEM_SCHEMA, InputProblem, problem
from api.responses import JSONResponse, dumps
from api.connections import Busy
from api.waiting import EventReader, TooManyWaiters
from blaze_jobs import events
from blaze_jobs.errors import JobNotFound
from blaze_jobs.events import event_order
from blaze_jobs.jobs import job_view
from blaze_jobs.settings import Settings, get_settings
from blaze_jobs.signing import signing_secret_async
from blaze_jobs.webhooks import (
    REDELIVER_LUA,
    Delivery,
    DeliveryPage,
    WebhookRefused,
    check_addresses,
    delivery_list,
)

#: An event stream with nothing new sends a keep-alive comment this often, which also finds
#: clients that went away.
KEEP_ALIVE_S = 15.0
#: How long a webhook host may take to resolve when a job is created.
DNS_TIMEOUT_S = 5.0
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
PROBLEM = {"content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}, "description": "A problem+json body naming the fault."}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.reader = EventReader(settings_of(app), app.state.redis)
    await app.state.reader.start()
    yield
    await app.state.reader.close()


router = APIRouter(lifespan=lifespan)


def settings_of(app: FastAPI) -> Settings:
    store = getattr(app.state, "store", None)
    return store.settings if store is not None else get_settings()


def raw_header(request: Request, name: bytes) -> bytes | None:
    """A request header by its lower-case name, read straight off the ASGI scope (the create
    route reads two: building ``request.headers`` for them costs more than the look-ups)."""
    return next((value for key, value in request.scope["headers"] if key == name), None)


#: Base URLs by what they are made of; Starlette builds one in about 10 µs, every request.
_BASE_URLS: dict[tuple[Any, ...], str] = {}


def base_url(request: Request) -> str:
    """Where the client reached the API (``BLAZE_PUBLIC_URL`` if set), without a final slash."""
    public = settings_of(request.app).public_url
    if public:
        return public
    scope = request.scope
    server = scope.get("server")  # a tuple from uvicorn, a list from some test clients
    key = (scope["scheme"], raw_header(request, b"host"), tuple(server) if server else None, scope.get("root_path", ""))
    url = _BASE_URLS.get(key)
    if url is None:
        if len(_BASE_URLS) >= 256:  # the Host header is the client's to choose: stay bounded
            _BASE_URLS.clear()
        url = _BASE_URLS[key] = str(request.base_url).rstrip("/")
    return url


# --- used by the create and get routes ----------------------------------------------------


async def webhook_fields(body: Any, settings: Settings) -> dict[str, str]:
    """The job record's webhook fields, once the URL is known to lead to a public address
    (unless ``BLAZE_WEBHOOK_ALLOW_PRIVATE``); a 422 naming ``webhook`` otherwise."""
    if body.webhook is None:
        return {}
    if not settings.webhook_allow_private:
        host, port = body.webhook.host or "", body.webhook.port or 443
        try:
            try:
                addresses = [str(ipaddress.ip_address(host.strip("[]")))]
            except ValueError:
                loop = asyncio.get_running_loop()
                infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), DNS_TIMEOUT_S)
                addresses = [info[4][0] for info in infos]
            check_addresses(host, addresses)
        except (socket.gaierror, asyncio.TimeoutError):
            raise InputProblem("webhook", f"{host} does not resolve") from None
        except WebhookRefused as refused:
            raise InputProblem("webhook", str(refused)) from None
    return {"webhook": str(body.webhook), "webhook_events": ",".join(dict.fromkeys(body.webhook_events_filter))}


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
        return await wait_for_end(request.app, record["id"], seconds)
    except (Busy, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        # The job is stored and queued: a 503 now would tell the client to create it again.
        # A wait is a preference (RFC 7240), so answer the job as accepted instead.
        return record


async def job_after_wait(request: Request, job_id: str, wait: float) -> dict[str, str]:
    """``GET /v1/jobs/{id}?wait=N``: the job as soon as it ends, or as it stands after N seconds."""
    settings = settings_of(request.app)
    if wait > settings.max_wait_s:
        raise InputProblem("wait", f"must be at most {settings.max_wait_s:g} seconds")
    if wait <= 0:
        return await request.app.state.store.get(job_id)
    return await wait_for_end(request.app, job_id, wait)


async def wait_for_end(app: FastAPI, job_id: str, seconds: float) -> dict[str, str]:
    prefix = settings_of(app).redis_prefix
    record, position = await events.job_and_position(app.state.store.redis, prefix=prefix, job_id=job_id)
    if not record:
        raise JobNotFound(job_id)
    deadline = time.monotonic() + seconds
    reader: EventReader = app.state.reader
    async with reader.watch(job_id, after=position) as feed:
        while not events.ended(record):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for event in await feed.next_events(left):
                record = events.apply(record, event)
    return record


# --- server-sent events -------------------------------------------------------------------


def sse(event_id: str, kind: str, data: Any) -> str:
    # Encoded as the JSON answers are, so that a stored record JSON cannot carry still streams.
    return f"id: {event_id}\nevent: {kind}\ndata: {dumps(data).decode()}\n\n"


def event_data(event: events.JobEvent, record: dict[str, str], *, base: str) -> Any:
    """What an SSE event carries: at a status change the job (``record`` is the job before
    it), with progress its ``{step, total}``, otherwise the event's fields."""
    if event.record is not None:
        return job_view(record, base_url=base)
    if event.type == "job.progress":
        return json.loads(event.fields["progress"])
    return event.fields


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "An event stream."}, 404: PROBLEM},
)
async def job_events(
    request: Request,
    job_id: str,
    last_event_id: Annotated[str | None, Header(description="Resume after this event id.")] = None,
) -> StreamingResponse:
    """The job's events as server-sent events, ending with the final job.

    The first event, `job`, is the job as it stands; then `job.started`, `job.progress`
    (`{step, total}`), `job.queued` (handed back to the queue after a worker fault) and
    `job.completed` (the final job), each with its event id. A client that reconnects with
    `Last-Event-ID` gets every event after that one and no `job` event; `Last-Event-ID: 0-0`
    replays the whole stream."""
    app, prefix = request.app, settings_of(request.app).redis_prefix
    record, position = await events.job_and_position(app.state.store.redis, prefix=prefix, job_id=job_id)
    if not record:
        raise JobNotFound(job_id)
    resume = last_event_id.strip() if last_event_id and EVENT_ID.match(last_event_id.strip()) else None
    # Refuse a stream past the waiter bound now, as a 503, rather than after its 200 has gone
    # out (the stream's watch checks again: another may have taken the last place meanwhile).
    if app.state.reader.waiters >= settings_of(app).max_waiters:
        raise TooManyWaiters(settings_of(app).max_waiters)
    stream = _event_stream(app, job_id, record=record, position=position, resume=resume, base=base_url(request))
    return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _event_stream(
    app: FastAPI, job_id: str, *, record: dict[str, str], position: str, resume: str | None, base: str
) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    if resume is None:
        yield sse(position, "job", job_view(record, base_url=base))
        after = position
    else:
        after = resume
    # A client that has seen the end of an ended job has nothing left to get.
    if events.ended(record) and event_order(after) >= event_order(position):
        return
    reader: EventReader = app.state.reader
    async with reader.watch(job_id, after=after) as feed:
        while True:
            new = await feed.next_events(KEEP_ALIVE_S)
            if not new:
                yield ": keep-alive\n\n"
                continue
            for event in new:
                record = events.apply(record, event)
                yield sse(event.id, event.type, event_data(event, record, base=base))
                if event.type == events.COMPLETED:
                    return


# --- webhook deliveries and the secret ----------------------------------------------------


@router.get("/v1/jobs/{job_id}/deliveries", response_model=DeliveryPage, responses={404: PROBLEM})
async def list_deliveries(request: Request, job_id: str) -> JSONResponse:
    """Every webhook delivery of the job, oldest first, with each attempt: when, the
    receiver's status code or the error, and how long it took."""
    store = request.app.state.store
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.exists(store.keys.job(job_id))
        pipe.hgetall(events.deliveries_key(store.keys.prefix, job_id))
        exists, raw = await pipe.execute()
    if not exists:
        raise JobNotFound(job_id)
    return JSONResponse({"deliveries": delivery_list(raw)})


@router.post(
    "/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver", status_code=202, response_model=Delivery, responses={404: PROBLEM}
)
async def redeliver(request: Request, job_id: str, delivery_id: str) -> JSONResponse:
    """Send a delivery's event again: a new delivery with the same `webhook-id` and body. It
    also lifts a receiver's earlier `410 Gone` for the job."""
    store = request.app.state.store
    script = store.redis.register_script(REDELIVER_LUA)
    reply = await script(keys=[events.deliveries_key(store.keys.prefix, job_id)], args=[store.keys.prefix, job_id, delivery_id])
    if reply is None:
        await store.get(job_id)  # 404 for the job first
        return problem(404, "Delivery not found", f"job {job_id} has no delivery {delivery_id!r}")
    (delivery,) = delivery_list({"new": reply})
    return JSONResponse(delivery, status_code=202)


@router.get("/v1/webhooks/secret", responses={401: PROBLEM, 403: PROBLEM})
async def webhook_secret(request: Request, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
    """The `whsec_` secret webhooks are signed with, for receivers to verify them. Needs
    `Authorization: Bearer <BLAZE_ADMIN_TOKEN>`; with no token configured, nobody gets it
    (never by the caller's address: a forwarded header can claim any)."""
    settings = settings_of(request.app)
    if not settings.admin_token:
        raise HTTPException(403, "the webhook secret needs an admin token: set BLAZE_ADMIN_TOKEN on the API and send Authorization: Bearer <token>")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.admin_token.encode()):
        raise HTTPException(
            401, "a valid admin token is required: send Authorization: Bearer <BLAZE_ADMIN_TOKEN>", headers={"WWW-Authenticate": "Bearer"}
        )
    return JSONResponse({"secret": await signing_secret_async(request.app.state.store.redis, settings)})
