"""Every error the API answers is ``application/problem+json`` (RFC 9457), naming the field."""

from __future__ import annotations

from typing import Any, Iterable

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.connections import Busy
from blaze_jobs.errors import JobConflict, JobNotFound
from blaze_jobs.settings import ENGINES

PROBLEM_JSON = "application/problem+json"
PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "description": "One entry per faulty field, e.g. `input.width`.",
            "items": {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}},
        },
    },
}
#: How long a client should wait before retrying while Redis is unreachable.
RETRY_AFTER_S = 2


class InputProblem(Exception):
    """Input that passed the schema but breaks a deployment bound or names an unknown thing."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def problem(status: int, title: str, detail: str, *, errors: list[dict[str, str]] | None = None, **headers: str) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers or None)


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
        if error.get("type") == "json_invalid":
            errors.append({"field": "body", "message": "the body is not valid JSON"})
            continue
        if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
            loc.append(error.get("ctx", {}).get("discriminator", "").strip("'"))
        errors.append({"field": field_name(loc), "message": error.get("msg", "invalid")})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "Invalid request", detail, errors=errors)


def install(app: FastAPI) -> None:
    """Map every error the API can meet to a problem+json answer."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation(request, exc)

    @app.exception_handler(InputProblem)
    async def on_input(request: Request, exc: InputProblem) -> JSONResponse:
        return problem(422, "Invalid request", str(exc), errors=[{"field": exc.field, "message": exc.message}])

    @app.exception_handler(JobNotFound)
    async def on_not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return problem(404, "Job not found", f"no job with id {exc.args[0]!r}")

    @app.exception_handler(JobConflict)
    async def on_conflict(request: Request, exc: JobConflict) -> JSONResponse:
        return problem(409, "Conflict", str(exc))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), str(exc.detail))

    @app.exception_handler(Busy)
    async def on_busy(request: Request, exc: Busy) -> JSONResponse:
        # A bound of the API process (its Redis pool, its waiters), not a Redis fault.
        return problem(503, "API busy", f"{exc}; retry shortly", **{"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        return problem(
            503, "Service unavailable", "the job store (Redis) is unreachable; retry shortly", **{"Retry-After": str(RETRY_AFTER_S)}
        )
