"""Request bounds: what one request may cost before anything is stored.

The body is bounded while it is read (``BLAZE_MAX_BODY_BYTES``, 413);
it must be UTF-8 JSON; a job's input must be JSON that every reader can read back (no NaN or
Infinity, no lone UTF-16 surrogates), no deeper than ``BLAZE_MAX_INPUT_DEPTH`` and no larger
as stored than ``BLAZE_MAX_INPUT_BYTES``; and each engine's fields stay within the
deployment's bounds. The OpenAPI document states the same bounds, read from the settings the
app was made with, so a request that the schema allows is one the API accepts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blaze_jobs.engines import SPECS, spec_of
from blaze_jobs.engines.spec import EngineSpec, OutOfBounds
from blaze_jobs.jobs import create_model_name
from blaze_jobs.settings import Settings

from .problems import InputProblem, problem
from .responses import LONE_SURROGATE

# --- the body ---------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: a body longer than ``max_bytes`` is a 413 problem, refused on its
    Content-Length before a byte is read, or as soon as what arrives passes the bound (a
    chunked body). FastAPI's own ``max_body_size`` answers a plain-text 413 instead."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, by_path: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        #: Paths with a bound of their own (``POST /v1/files`` takes a whole batch file).
        self.by_path = by_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.by_path.get(scope["path"], self.max_bytes) if self.by_path else self.max_bytes
        declared = next((value for key, value in scope["headers"] if key == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self.too_large(max_bytes)(scope, receive, send)
            return
        received = 0

        async def receive_bounded() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_bytes:
                # An HTTPException, so that FastAPI's body reading lets it through to the
                # problem handlers rather than calling it a parse error (400).
                raise HTTPException(413, self.detail(max_bytes))
            return message

        await self.app(scope, receive_bounded, send)

    def detail(self, max_bytes: int) -> str:
        return f"the body exceeds the limit of {max_bytes} bytes"

    def too_large(self, max_bytes: int) -> Response:
        # The unread body is still on its way: end the connection rather than read it.
        return problem(413, "Content Too Large", self.detail(max_bytes), headers={"Connection": "close"})


class JSONBodyRequest(Request):
    """A request whose JSON body is read as RFC 8259 says: UTF-8, and a body too deeply
    nested to read is bad JSON (422), not a fault of the parser (FastAPI's 400)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as error:
                raise json.JSONDecodeError(f"not UTF-8 at byte {error.start}", "", 0) from None
            try:
                self._json = json.loads(text)
            except RecursionError:
                raise json.JSONDecodeError("nested too deeply to read", "", 0) from None
        return self._json


class JSONBodyRoute(APIRoute):
    """A route that reads its body with :class:`JSONBodyRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def read_json_strictly(request: Request) -> Response:
            return await handler(JSONBodyRequest(request.scope, request.receive))

        return read_json_strictly


# --- a job's input ----------------------------------------------------------------------


def check_input(value: Any, *, stored: str, settings: Settings) -> None:
    """Refuse an input that is not plain JSON, too deep or too large as ``stored``, naming
    the field: it would fail every reader of the job (its page, the list, the worker)."""
    fault = _json_fault(value, depth=1, max_depth=settings.max_input_depth)
    if fault is not None:
        path, message = fault
        raise InputProblem(".".join(["input", *map(str, reversed(path))]), message)
    if len(stored) > settings.max_input_bytes:
        raise InputProblem("input", f"{len(stored)} bytes as stored exceeds the limit of {settings.max_input_bytes} bytes")


def _json_fault(value: Any, *, depth: int, max_depth: int) -> tuple[list[Any], str] | None:
    """What JSON cannot carry in ``value``: the path to it, innermost first, and why."""
    # On the create path: ASCII text skips the search, and a path is built only for a
    # fault. Recursion stops at max_depth, so an input nested thousands deep costs no stack.
    if isinstance(value, str):
        if not value.isascii() and LONE_SURROGATE.search(value):
            return [], "holds a lone UTF-16 surrogate, which is not Unicode text"
    elif isinstance(value, float):
        if not math.isfinite(value):
            return [], f"{value} is not a JSON number (JSON has no NaN or Infinity)"
    elif isinstance(value, (dict, list)):
        if depth > max_depth:
            return [], f"nested deeper than {max_depth} levels"
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(key, str) and not key.isascii() and LONE_SURROGATE.search(key):
                return [], "a key holds a lone UTF-16 surrogate, which is not Unicode text"
            fault = _json_fault(item, depth=depth + 1, max_depth=max_depth)
            if fault is not None:
                fault[0].append(key)
                return fault
    return None


def check_bounds(body: Any, settings: Settings, *, spec: EngineSpec | None = None) -> None:
    """Reject input beyond this deployment's bounds (``body`` is a ``JobCreate``), naming the
    field: the bounds its engine's spec declares, then the spec's own check."""
    spec = spec or spec_of(body.engine)
    job = body.input
    for bound in spec.bounds:
        # A bound on a nested model (a chat message) is stated in the schema only; the
        # spec's check bounds the whole.
        value = getattr(job, bound.field) if isinstance(job, bound.model) else None
        if value is None:
            continue
        if bound.items:
            measure = max(map(len, value), default=0)
        else:
            measure = len(value) if isinstance(value, (str, list)) else value
        limit = getattr(settings, bound.setting)
        if measure > limit:
            raise InputProblem(f"input.{bound.field}", f"{measure} exceeds the limit of {limit} {bound.unit}")
    if spec.check is not None:
        model = getattr(body, "model", None) or spec.default_model(settings)
        try:
            spec.check(job, settings, model)
        except OutOfBounds as error:
            raise InputProblem(error.field, error.message) from None


# --- the schema -------------------------------------------------------------------------


def state_bounds(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``schema`` (an OpenAPI document) with this deployment's bounds on the input fields."""
    models = schema.get("components", {}).get("schemas", {})

    def constrain(model: type[BaseModel], field: str, limit: int, *, items: bool = False) -> None:
        prop = models.get(model.__name__, {}).get("properties", {}).get(field)
        # An optional field is `anyOf: [{type: ...}, {type: null}]`: bound the branch it fits.
        for branch in prop.get("anyOf", [prop]) if prop else []:
            kind = branch.get("type")
            if items and kind == "array":
                branch.setdefault("items", {})["maxLength"] = limit
            elif not items and kind in ("string", "array", "integer", "number"):
                keyword = {"string": "maxLength", "array": "maxItems"}.get(kind, "maximum")
                branch[keyword] = limit

    for bound in (bound for spec in SPECS for bound in spec.bounds):
        constrain(bound.model, bound.field, getattr(settings, bound.setting), items=bound.items)
    # A job names one of its engine's models this deployment serves, or none (the default).
    for spec in SPECS:
        prop = models.get(create_model_name(spec), {}).get("properties", {}).get("model")
        for branch in prop.get("anyOf", [prop]) if prop else []:
            if branch.get("type") == "string":
                branch["enum"] = spec.allowed_models(settings)
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    """Bound request bodies, read JSON bodies strictly on the routes declared after this,
    and state the bounds in the app's OpenAPI document."""
    # A file upload's multipart framing takes a few hundred bytes beside the file.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, by_path={"/v1/files": settings.file_max_bytes + 65_536})
    app.router.route_class = JSONBodyRoute
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = state_bounds(generate(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
