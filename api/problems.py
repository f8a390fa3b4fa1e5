"""Every error the API answers is ``application/problem+json`` (RFC 9457), naming the field."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blaze_jobs.errors import ClaimTakenOver, JobConflict, JobNotFound, QueueFull, QuotaExceeded
from blaze_jobs.redis_config import refusal
from blaze_jobs.settings import ENGINES

from . import metrics as api_metrics
from .connections import Busy
from .rate_limits import RateLimited

PROBLEM_JSON = "application/problem+json"
PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "id": {"type": "string", "description": "This answer's id; the API's log carries it, with the cause."},
        "errors": {
            "type": "array",
            "description": "One entry per faulty field, e.g. `input.width`.",
            "items": {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}},
        },
        # The members of the refusals a client may wait out (their `type` says which).
        "tenant": {"type": "string", "description": "Job quota: the tenant at its quota."},
        "count": {"type": "integer", "description": "Job quota: the tenant's jobs queued or running now."},
        "limit": {"type": "integer", "description": "Job quota, rate limit, full queue: the bound met."},
        "window_s": {"type": "integer", "description": "Rate limit: the window the key's rate counts requests in."},
        "engine": {"type": "string", "description": "Full queue: the engine whose queue is full."},
        "length": {"type": "integer", "description": "Full queue: the messages in its queue."},
    },
}
#: How long a client should wait before retrying while Redis is unreachable.
RETRY_AFTER_S = 2
#: How long a client should wait while Redis refuses writes (at its memory limit): room comes
#: back as jobs expire or an operator acts, not within the seconds a restart takes.
REFUSED_RETRY_AFTER_S = 10
#: How long a client should wait at a tenant's quota or a full engine queue: room comes back
#: as jobs end, which on a busy deployment is every few seconds.
BACKLOG_RETRY_AFTER_S = 5
#: Problem types of the refusals a client may act on by waiting (RFC 9457 section 3.1.1: a
#: tag URI names a type without promising a page behind it).
PROBLEM_TYPES = "tag:blaze-jobs.dev,2026:"
RATE_LIMITED = f"{PROBLEM_TYPES}rate-limit"
QUOTA_JOBS = f"{PROBLEM_TYPES}quota/jobs"
QUEUE_FULL = f"{PROBLEM_TYPES}queue-full"

log = logging.getLogger("blaze_jobs.api.problems")


class InputProblem(Exception):
    """Input that passed the schema but breaks a deployment bound or names an unknown thing."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    problem_id: str = "",
    headers: dict[str, str] | None = None,
    type: str = "about:blank",
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """A problem+json answer with an id the log carries (a caller that logged the cause
    itself passes its ``problem_id``); ``type`` names a problem a client may tell apart, and
    ``extra`` adds that problem's own members (a quota's ``count`` and ``limit``)."""
    if not problem_id:
        problem_id = str(uuid.uuid4())
        log.log(logging.ERROR if status >= 500 else logging.INFO, "problem %s: %d %s: %s", problem_id, status, title, detail)
    body: dict[str, Any] = {"type": type, "title": title, "status": status, "detail": detail, "id": problem_id}
    if extra:
        body.update(extra)
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def field_name(loc: Iterable[Any]) -> str:
    """``("body", "diffusion", "input", "width")`` -> ``"input.width"``."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # A discriminated union puts the engine tag in the path; the client never wrote it.
    if parts and parts[0] in ENGINES:
        parts = parts[1:]
    return ".".join(parts) or "body"


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for error in exc.errors():
        loc = list(error.get("loc", ()))
        if loc[:1] == ["body"] and len(loc) > 1 and loc[1] in ENGINES:  # the engine tag of a job's body
            api_metrics.note_engine(request.scope, loc[1])
        if error.get("type") == "json_invalid":
            why = error.get("ctx", {}).get("error")
            errors.append(
                {"field": "body", "message": f"the body is not valid JSON ({why})" if why else "the body is not valid JSON"}
            )
            continue
        if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
            loc.append(error.get("ctx", {}).get("discriminator", "").strip("'"))
        errors.append({"field": field_name(loc), "message": error.get("msg", "invalid")})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "Invalid request", detail, errors=errors)


class UnexpectedErrors:
    """ASGI middleware: an exception no handler took is a 500 problem whose id the log
    carries with the traceback. Answered here, below Starlette's last-resort handler, the
    connection stays open and the traceback is logged once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception:
            problem_id = str(uuid.uuid4())
            log.exception("problem %s: 500 on %s %s", problem_id, scope.get("method"), scope.get("path"))
            if started:  # half an answer is out: only the server can end it, by closing
                raise
            detail = f"an unexpected error; the API's log has its cause under id {problem_id}"
            await problem(500, "Internal error", detail, problem_id=problem_id)(scope, receive, send)


def allowed_methods(request: Request) -> str:
    """Every method some route takes at the request's path (Starlette's 405 names only the
    first route that matched the path, so `GET /v1/jobs` was missing from a `DELETE`'s)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    """Map every error the API can meet to a problem+json answer."""
    app.add_middleware(UnexpectedErrors)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation(request, exc)

    @app.exception_handler(InputProblem)
    async def on_input(request: Request, exc: InputProblem) -> JSONResponse:
        return problem(422, "Invalid request", str(exc), errors=[{"field": exc.field, "message": exc.message}])

    @app.exception_handler(JobNotFound)
    async def on_not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return problem(404, "Job not found", f"no job with id {exc.args[0]!r}")

    @app.exception_handler(ClaimTakenOver)
    async def on_claim_taken_over(request: Request, exc: ClaimTakenOver) -> JSONResponse:
        # This create ran so late that a retry took its Idempotency-Key over: the retry's job is
        # the one, and the next retry is answered with it.
        detail = "a retry with this Idempotency-Key took over while this request waited; retry to get its job"
        return problem(409, "Conflict", detail, headers={"Retry-After": "1"})

    @app.exception_handler(JobConflict)
    async def on_conflict(request: Request, exc: JobConflict) -> JSONResponse:
        return problem(409, "Conflict", str(exc))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        # Its headers say how to go on: `Allow` on a 405, `WWW-Authenticate` on a 401.
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        try:
            title = HTTPStatus(exc.status_code).phrase
        except ValueError:  # a status code Python has no name for
            title = str(exc.detail)
        return problem(exc.status_code, title, str(exc.detail), headers=headers)

    @app.exception_handler(Busy)
    async def on_busy(request: Request, exc: Busy) -> JSONResponse:
        # A bound of the API process (its Redis pool, its waiters), not a Redis fault.
        return problem(503, "API busy", f"{exc}; retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(RateLimited)
    async def on_rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
        if api_metrics.create_route(request.scope):  # refused before the body was read: the route's engine, if any
            api_metrics.rejected(api_metrics.engine_of(request.scope), "rate_limit")
        extra = {"limit": exc.quota, "window_s": exc.window_s}
        return problem(429, "Too many requests", str(exc), type=RATE_LIMITED, extra=extra, headers=exc.headers)

    @app.exception_handler(QuotaExceeded)
    async def on_quota(request: Request, exc: QuotaExceeded) -> JSONResponse:
        # A quota of the tenant, not of the request rate: waiting helps once its jobs end.
        return problem(
            429,
            "Job quota exceeded",
            f"{exc}; retry once some of its jobs end",
            type=QUOTA_JOBS,
            extra={"tenant": exc.tenant, "count": exc.count, "limit": exc.limit},
            headers={"Retry-After": str(BACKLOG_RETRY_AFTER_S)},
        )

    @app.exception_handler(QueueFull)
    async def on_queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        # The deployment's backpressure: refused before Redis fills up and refuses everything.
        return problem(
            503,
            "Queue full",
            f"{exc}; retry later",
            type=QUEUE_FULL,
            extra={"engine": exc.engine, "length": exc.length, "limit": exc.limit},
            headers={"Retry-After": str(BACKLOG_RETRY_AFTER_S)},
        )

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        return problem(
            503,
            "Service unavailable",
            "the job store (Redis) is unreachable; retry shortly",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.exception_handler(redis.exceptions.ResponseError)
    async def on_redis_refusal(request: Request, exc: redis.exceptions.ResponseError) -> JSONResponse:
        # A full Redis (or a replica) refuses the write, and nothing was stored: the client
        # may retry later. Any other error Redis answers is ours, and stays a 500.
        why = refusal(exc)
        if why is None:
            raise exc
        return problem(503, "Service unavailable", f"{why}; retry later", headers={"Retry-After": str(REFUSED_RETRY_AFTER_S)})
