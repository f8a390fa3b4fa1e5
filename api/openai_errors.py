"""OpenAI's error shape on the OpenAI-compatible routes: ``{"error": {"message", "type",
"param", "code"}}`` with the status the ``openai`` client turns into its own exceptions
(400 ``BadRequestError`` with ``.param``, 401, 404 ``NotFoundError``, 429 ``RateLimitError``,
5xx ``InternalServerError``).

A router made with ``route_class=OpenAIRoute`` answers every error this way: an
``OpenAIError`` its code raises, and every error the rest of the API answers as problem+json
(``api/problems.py``: bad input, auth, quotas, full queues, an unreachable Redis, a missing
job, an unexpected fault), translated with its status and headers (``Retry-After``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError

from .bounds import JSONBodyRoute
from .problems import PROBLEM_TYPES, InputProblem, problem
from .responses import JSONResponse

log = logging.getLogger("blaze_jobs.api.openai_errors")

#: OpenAI's error ``type`` by status, for the answers that carry no type of their own.
TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "requests",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}
#: OpenAI's error ``code`` for the problem types the rest of the API answers with.
CODES = {
    f"{PROBLEM_TYPES}rate-limit": "rate_limit_exceeded",
    f"{PROBLEM_TYPES}quota/jobs": "quota_exceeded",
    f"{PROBLEM_TYPES}queue-full": "queue_full",
}
#: Headers of a problem answer that say how to go on, kept on its OpenAI answer.
KEPT_HEADERS = ("retry-after", "www-authenticate", "allow", "ratelimit", "ratelimit-policy", "x-should-retry")


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: ``status``, and the body's message, type, param, code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"OpenAIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}``, as the route answers it (and a batch's error line carries it)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(param: str | None, message: str, *, code: str | None = None) -> OpenAIError:
    """A 400 for a bad request body, naming the faulty ``param`` as the client wrote it."""
    return OpenAIError(400, message, param=param, code=code or "invalid_value")


def model_not_found(model: str, known: Iterable[str]) -> OpenAIError:
    """A 404 for a model this deployment does not serve, with the ones it does."""
    message = f"The model {model!r} does not exist on this deployment; known models: {', '.join(known)}"
    return OpenAIError(404, message, param="model", code="model_not_found")


def param_name(loc: Iterable[Any]) -> str | None:
    """A pydantic error location as OpenAI names parameters: ``("body", "messages", 0, "content")``
    -> ``"messages[0].content"``."""
    name = ""
    for part in loc:
        if part in ("body",) and not name:
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or None


def from_validation(errors: Iterable[Mapping[str, Any]], *, rename: Callable[[str], str] | None = None) -> OpenAIError:
    """A 400 for pydantic's errors (``exc.errors()``), naming the first faulty parameter; the
    message lists them all. ``rename`` turns a field of the job made from the request back
    into the parameter the client wrote (``input.num_outputs`` -> ``n``)."""
    faults: list[tuple[str | None, str]] = []
    for error in errors:
        kind = error.get("type")
        if kind == "json_invalid":
            faults.append((None, "We could not parse the JSON body of your request: it is not valid JSON"))
            continue
        param = param_name(error.get("loc", ()))
        if param is not None and rename is not None:
            param = rename(param)
        if kind == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param} (this deployment cannot honour it)"
        elif kind == "missing":
            message = f"Missing required parameter: {param!r}"
        else:
            message = f"Invalid value for {param!r}: {error.get('msg', 'invalid')}"
        faults.append((param, message))
    if not faults:
        return invalid(None, "Invalid request")
    code = "missing_required_parameter" if faults[0][1].startswith("Missing") else None
    return invalid(faults[0][0], "; ".join(message for _, message in faults), code=code)


def from_problem(response: Response) -> OpenAIError:
    """The OpenAI answer for a problem+json answer of the rest of the API: its status (422,
    invalid input, becomes OpenAI's 400), detail, faulty field and the headers that say how
    to go on."""
    try:
        body = json.loads(bytes(response.body))
    except ValueError:
        body = {}
    status = 400 if response.status_code == 422 else response.status_code
    fields = body.get("errors") or [{}]
    message = str(body.get("detail") or body.get("title") or "error")
    if status == 401:
        code: str | None = "invalid_api_key"
    elif status == 404:
        code = "not_found"
    else:
        code = CODES.get(str(body.get("type")))
    headers = {name: value for name, value in response.headers.items() if name.lower() in KEPT_HEADERS}
    return OpenAIError(status, message, param=fields[0].get("field"), code=code, headers=headers)


async def answer_for(request: Request, exc: Exception) -> JSONResponse:
    """The OpenAI answer for ``exc``, raised while a route served ``request``."""
    if isinstance(exc, OpenAIError):
        return exc.response()
    if isinstance(exc, RequestValidationError):
        return from_validation(exc.errors()).response()
    if isinstance(exc, InputProblem):  # a field of the job the route made, named as the API names it
        return invalid(exc.field, exc.message).response()
    # Everything else as the rest of the API answers it, then in OpenAI's shape.
    handler = next(
        (request.app.exception_handlers[kind] for kind in type(exc).__mro__ if kind in request.app.exception_handlers), None
    )
    try:
        if handler is None:
            raise exc
        answer = await handler(request, exc)
    except Exception:
        problem_id = str(uuid.uuid4())
        log.exception("problem %s: 500 on %s %s", problem_id, request.method, request.url.path)
        answer = problem(
            500,
            "Internal error",
            f"an unexpected error; the API's log has its cause under id {problem_id}",
            problem_id=problem_id,
        )
    return from_problem(answer).response()


class OpenAIRoute(JSONBodyRoute):
    """A route whose errors are answered in OpenAI's shape (the body read strictly, as on
    every route of the API)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer_openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return await answer_for(request, exc)

        return answer_openai_errors
