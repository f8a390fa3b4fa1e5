"""OpenAI's models, images, chat and completions routes, for the unmodified ``openai`` client
(``openai.OpenAI(api_key=KEY, base_url=API + "/v1")``).

Each create is one Blaze job made by the one create path (``api/creation.py``), with the same
bounds, tenant, quota, cache, batching and webhooks as any other; the route answers once the
job ends, within ``BLAZE_OPENAI_WAIT_S`` (past it, the error names the job, which goes on).
Chat and completions stream with ``stream: true``: the job's text as it is made, in
OpenAI's chunks, ending with ``data: [DONE]``. Errors are in OpenAI's shape
(``api/openai_errors.py``), and the client's own retries get the first attempt's job
(``api/openai_retries.py``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from blaze_jobs import events
from blaze_jobs.api_keys import ApiKey
from blaze_jobs.engines import SPECS
from blaze_jobs.errors import JobNotFound
from blaze_jobs.settings import Settings

from . import creation, openai_retries, waits
from . import metrics as api_metrics
from .artifacts import signer_of
from .auth import Caller
from .event_reader import EventReader
from .openai_bodies import (
    CHAT,
    COMPLETIONS,
    IMAGES,
    ChatRequest,
    CompletionRequest,
    ImageRequest,
    finish_reason,
    job_failure,
    job_for,
    job_unfinished,
    param_for,
    response_for,
    usage_of,
)
from .openai_errors import OpenAIRoute, invalid, model_not_found
from .problems import InputProblem
from .request_context import base_url, raw_header, settings_of
from .responses import JSONResponse, dumps

ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR = {"content": {"application/json": {"schema": ERROR_SCHEMA}}, "description": "OpenAI's error shape."}
ERRORS: dict[int | str, dict[str, Any]] = {status: ERROR for status in (400, 401, 404, 429, 500, 503, 504)}
#: The share of the client's read timeout a create waits for its job: the rest carries the
#: answer back before the client gives up.
READ_TIMEOUT_SHARE = 0.8
#: When this process started: a model's ``created`` (a deployment's models have no other date).
STARTED = int(time.time())

router = APIRouter(route_class=OpenAIRoute, tags=["OpenAI"])


# --- models -------------------------------------------------------------------------------


def _models(settings: Settings) -> list[dict[str, Any]]:
    return [
        {"id": model, "object": "model", "created": STARTED, "owned_by": "blaze-jobs", "engine": spec.name}
        for spec in SPECS
        for model in settings.allowed_models(spec.name)
    ]


@router.get("/v1/models", responses=ERRORS)
async def list_models(request: Request, caller: Caller) -> JSONResponse:
    """The models this deployment serves, each with the `engine` that runs it."""
    return JSONResponse({"object": "list", "data": _models(settings_of(request.app))})


class ModelId(Convertor[str]):
    """A model id in a path: one segment, or two (a Hugging Face id, `org/name`, whose slash
    the client sends encoded and the router sees decoded)."""

    regex = r"[^/]+(?:/[^/]+)?"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model_id", ModelId())
# Included after every other router: a two-segment id that another route takes (Replicate's
# `/v1/models/blaze/{name}`) stays that route's, and longer paths (its versions and
# predictions) are never this one's.
model_router = APIRouter(route_class=OpenAIRoute, tags=["OpenAI"])


@model_router.get("/v1/models/{model:model_id}", responses=ERRORS)
async def get_model(request: Request, caller: Caller, model: str) -> JSONResponse:
    """One model of this deployment (its id may hold a slash); 404 `model_not_found` for any other."""
    models = _models(settings_of(request.app))
    found = next((m for m in models if m["id"] == model), None)
    if found is None:
        raise model_not_found(model, [m["id"] for m in models])
    return JSONResponse(found)


# --- creates ------------------------------------------------------------------------------


async def _job_of(
    request: Request, caller: ApiKey, url: str, body: dict[str, Any], parsed: BaseModel
) -> tuple[dict[str, str], str]:
    # The job this request is answered with, and the id of its latest event: the job an
    # earlier attempt of it made (the client's own retry), else a new one.
    earlier = await openai_retries.earlier_job(request, caller, url, body)
    if earlier is not None:
        try:
            found = await waits.stream_start(request.app, earlier, tenant=caller.tenant)
        except JobNotFound:  # gone since (its retention ran out): make it again
            pass
        else:
            api_metrics.job_answered(request.scope)
            return found
    job = job_for(url, body, settings_of(request.app), parsed=parsed)
    try:
        record, _ = await creation.create(request, caller, job, extra={"surface": "openai", "openai_route": url})
    except InputProblem as problem:  # a bound of the stored job (its depth, its size)
        raise invalid(param_for(url, problem.field, body), problem.message) from None
    await openai_retries.remember(request, caller, url, body, record["id"])
    # A job just made has no event yet (one born from the cache has ended already).
    return record, "0-0"


def _wait_s(request: Request) -> float:
    # BLAZE_OPENAI_WAIT_S, or less when the client says it stops reading sooner
    # (x-stainless-read-timeout), so that it gets the error naming the job rather than a
    # timeout of its own (and its retry waits on the same job).
    wait = settings_of(request.app).openai_wait_s
    declared = raw_header(request, b"x-stainless-read-timeout")
    try:
        read_timeout = float(declared) if declared is not None else math.inf
    except ValueError:
        read_timeout = math.inf
    if math.isfinite(read_timeout) and read_timeout > 0:
        wait = min(wait, read_timeout * READ_TIMEOUT_SHARE)
    return wait


async def _answer(request: Request, caller: ApiKey, url: str, body: dict[str, Any], parsed: BaseModel) -> JSONResponse:
    # Make (or find) the job, wait for its end, and answer OpenAI's response object.
    record, position = await _job_of(request, caller, url, body, parsed)
    wait = _wait_s(request)
    record = await waits.wait_for_end(request.app, record["id"], wait, tenant=caller.tenant, known=(record, position))
    if not events.ended(record):
        raise job_unfinished(record, waited_s=wait)
    options: dict[str, Any] = {
        "request_body": body,
        "base_url": base_url(request),
        "signer": signer_of(request),
        "artifacts": request.app.state.artifacts,
    }
    if url == IMAGES and body.get("response_format") == "b64_json":  # reads the images' bytes
        return JSONResponse(await run_in_threadpool(lambda: response_for(url, record, **options)))
    return JSONResponse(response_for(url, record, **options))


@router.post("/v1/images/generations", responses=ERRORS)
async def create_images(request: Request, caller: Caller, body: Annotated[ImageRequest, Body()]) -> JSONResponse:
    """Generate `n` images (one diffusion job) and answer once they are made: signed URLs
    (`response_format: url`, the default) or the bytes, base64 (`b64_json`)."""
    return await _answer(request, caller, IMAGES, await request.json(), body)


@router.post("/v1/chat/completions", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
async def create_chat_completion(request: Request, caller: Caller, body: Annotated[ChatRequest, Body()]) -> Response:
    """Answer the chat (one text job): a `chat.completion` once the job ends, or with
    `stream: true` its `chat.completion.chunk`s as the text is made, then `data: [DONE]`."""
    raw = await request.json()
    if body.stream:
        return await _stream(request, caller, CHAT, raw, body, include_usage=_include_usage(body))
    return await _answer(request, caller, CHAT, raw, body)


@router.post("/v1/completions", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
async def create_completion(request: Request, caller: Caller, body: Annotated[CompletionRequest, Body()]) -> Response:
    """Continue the prompt (one text job): a `text_completion` once the job ends, or with
    `stream: true` its chunks as the text is made, then `data: [DONE]`."""
    raw = await request.json()
    if body.stream:
        return await _stream(request, caller, COMPLETIONS, raw, body, include_usage=_include_usage(body))
    return await _answer(request, caller, COMPLETIONS, raw, body)


# --- streams ------------------------------------------------------------------------------


def _include_usage(body: ChatRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _stream(
    request: Request, caller: ApiKey, url: str, body: dict[str, Any], parsed: BaseModel, *, include_usage: bool
) -> EventSourceResponse:
    # Everything that can refuse the request does so now, before the 200 goes out.
    record, _ = await _job_of(request, caller, url, body, parsed)
    app, settings = request.app, settings_of(request.app)
    record, _ = await waits.stream_start(app, record["id"], tenant=caller.tenant)
    chunks = _chunks(app.state.reader, url, record, include_usage=include_usage, wait_s=settings.openai_wait_s)
    return waits.event_stream_response(chunks, settings)


def _data(value: Any) -> ServerSentEvent:
    return ServerSentEvent(dumps(value).decode(), sep=waits.LINE_END)


async def _chunks(
    reader: EventReader, url: str, record: dict[str, str], *, include_usage: bool, wait_s: float
) -> AsyncIterator[ServerSentEvent]:
    # The job's text as OpenAI's chunks: a first one naming the assistant, one per piece of text,
    # a last one with `finish_reason` (and, when asked, one with `usage`), then [DONE]. The job's
    # events are read from its stream's start, so a retry streams the whole text too.
    job_id, chat = record["id"], url == CHAT
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = int(float(record["created_at"]))

    def chunk(text: str | None, *, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = {"role": "assistant", "content": text or ""} if role else {"content": text}
        else:
            choice["text"] = text or ""
        return {"id": job_id, "object": kind, "created": created, "model": record["model"], "choices": [choice]}

    if chat:
        yield _data(chunk("", role=True))
    sent = ""
    deadline = time.monotonic() + wait_s
    if not events.ended(record):
        async with waits.open_stream("sse"), reader.watch(job_id, after="0-0") as feed:
            while not events.ended(record):
                left = deadline - time.monotonic()
                if left <= 0:
                    # The job goes on; the error names it.
                    yield _data(job_unfinished(record, waited_s=wait_s).body())
                    return
                # Each wait is bounded, so the deadline is met (the keep-alives go out meanwhile).
                for event in await feed.next_events(min(left, reader.settings.event_keep_alive_s)):
                    record = events.apply(record, event)
                    piece = event.fields.get("text") if event.type == "job.delta" else None
                    if piece:
                        sent += piece
                        yield _data(chunk(piece))
    if record.get("status") != "succeeded":
        yield _data(job_failure(record).body())
        return
    output = json.loads(record["output"])
    # What the deltas did not carry (a job born from the cache made none), so the chunks
    # join to the text the job ended with.
    text = str(output.get("text", ""))
    rest = text[len(sent) :] if text.startswith(sent) else ""
    if rest:
        yield _data(chunk(rest))
    last = chunk(None, finish=finish_reason(output))
    if chat:
        last["choices"][0]["delta"] = {}
    yield _data({**last, "usage": None})
    if include_usage:
        yield _data({**chunk(None), "choices": [], "usage": usage_of(output)})
    yield ServerSentEvent("[DONE]", sep=waits.LINE_END)
