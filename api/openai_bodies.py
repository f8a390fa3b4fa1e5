"""OpenAI's request bodies read into Blaze jobs, and ended jobs written as OpenAI's responses.

``job_for`` turns the body of ``POST /v1/images/generations`` (a ``diffusion`` job),
``/v1/chat/completions`` or ``/v1/completions`` (an ``llm`` job) into the ``JobCreate`` the
one create path takes; ``response_for`` turns the ended job into the object the route
answers. The routes (``api/openai_routes.py``) and a batch's lines (``api/openai_batches.py``)
both go through these two, so a batch line's ``response.body`` is what the route answers.
Errors are ``OpenAIError``s naming the parameter as the client wrote it.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from blaze_jobs.artifacts import ArtifactStore, UrlSigner, artifact_name
from blaze_jobs.jobs import JobCreate, job_view
from blaze_jobs.settings import Settings

from . import bounds
from .openai_errors import OpenAIError, from_validation, invalid, model_not_found
from .problems import InputProblem

IMAGES = "/v1/images/generations"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
#: The engine each route's jobs run on.
ENGINE_OF = {IMAGES: "diffusion", CHAT: "llm", COMPLETIONS: "llm"}
SIZE = re.compile(r"\A(\d{1,5})x(\d{1,5})\Z")


class _Body(BaseModel):
    # A parameter this deployment cannot honour is refused by name, not silently dropped.
    model_config = ConfigDict(extra="forbid")


# --- images -------------------------------------------------------------------------------


class ImageRequest(_Body):
    """``POST /v1/images/generations``: one diffusion job making ``n`` images."""

    prompt: str = Field(min_length=1, description="What the images should show.")
    model: str | None = Field(
        None, description="A diffusion model of this deployment (`GET /v1/models`); its default when absent."
    )
    n: int | None = Field(None, ge=1, description="How many images (at most BLAZE_MAX_OUTPUTS); image i uses seed + i.")
    size: str | None = Field(
        None,
        description="`WIDTHxHEIGHT` in pixels, each a multiple of 8 within the deployment's bounds; "
        "`auto` or absent: the model's own.",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="`url` (default): signed URLs that expire with the job; `b64_json`: the image bytes, base64."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Encoding of the images; png by default.")
    user: str | None = Field(None, description="Accepted and ignored.")
    stream: Literal[False] | None = Field(None, description="Image streaming is not supported: false or absent.")
    # Blaze's own, through the client's `extra_body`.
    negative_prompt: str | None = Field(None, description="Blaze: what the images should avoid.")
    num_inference_steps: int | None = Field(None, ge=1, description="Blaze: denoising steps (default 20).")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Blaze: how strongly the images follow the prompt.")
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Blaze: the seed; the same seed and input give the same bytes."
    )


def _image_job(request: ImageRequest) -> dict[str, Any]:
    job: dict[str, Any] = {"prompt": request.prompt}
    if request.size not in (None, "auto"):
        found = SIZE.match(request.size or "")
        if found is None:
            raise invalid("size", f"Invalid value for 'size': {request.size!r}; expected WIDTHxHEIGHT, e.g. '512x512', or 'auto'")
        job["width"], job["height"] = int(found[1]), int(found[2])
    if request.n is not None:
        job["num_outputs"] = request.n
    for field in ("output_format", "negative_prompt", "num_inference_steps", "guidance_scale", "seed"):
        if getattr(request, field) is not None:
            job[field] = getattr(request, field)
    return job


# --- chat and completions -----------------------------------------------------------------


class Message(_Body):
    """One turn of the chat."""

    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who speaks; `developer` counts as `system`.")
    content: str | list[dict[str, Any]] = Field(
        description='What they say: text, or a list of text parts (`{"type": "text", "text": ...}`, joined).'
    )
    name: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        # One check with one message, rather than pydantic's try of each member of the union.
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError("must be a string or a list of text parts")
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"part {i} is of type {kind!r}; this deployment reads only text parts ({{'type': 'text', 'text': ...}})"
                )
        return content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part["text"] for part in self.content)


class StreamOptions(_Body):
    include_usage: bool | None = Field(None, description="Send a last chunk with `usage` (and no choices) before `[DONE]`.")


class _TextBody(_Body):
    model: str | None = Field(None, description="A text model of this deployment (`GET /v1/models`); its default when absent.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (at most BLAZE_LLM_MAX_NEW_TOKENS).")
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="The same seed and input give the same text.")
    stop: str | list[str] | None = Field(None, description="Up to four strings where generation ends (not part of the text).")
    n: Literal[1] | None = Field(None, description="One choice per request: 1 or absent.")
    stream: bool | None = Field(None, description="Answer as server-sent chunks ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="With `stream`: whether a last chunk carries `usage`.")
    presence_penalty: Literal[0] | None = Field(None, description="Not supported: 0 or absent.")
    frequency_penalty: Literal[0] | None = Field(None, description="Not supported: 0 or absent.")
    user: str | None = Field(None, description="Accepted and ignored.")


class ChatRequest(_TextBody):
    """``POST /v1/chat/completions``: one text job answering the chat."""

    messages: list[Message] = Field(min_length=1, description="The chat so far; the model writes the assistant's next turn.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="The same as `max_tokens` (which wins when both are given)."
    )
    logprobs: Literal[False] | None = Field(None, description="Not supported: false or absent.")


class CompletionRequest(_TextBody):
    """``POST /v1/completions``: one text job continuing the prompt."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="The text to continue (a list of exactly one string is accepted)."
    )
    echo: Literal[False] | None = Field(None, description="Not supported: false or absent.")
    suffix: None = Field(None, description="Not supported: absent.")
    logprobs: None = Field(None, description="Not supported: absent.")


#: The request model each route reads.
REQUESTS: dict[str, type[_Body]] = {IMAGES: ImageRequest, CHAT: ChatRequest, COMPLETIONS: CompletionRequest}


def _text_job(request: _TextBody) -> dict[str, Any]:
    job: dict[str, Any] = {}
    if isinstance(request, ChatRequest):
        job["messages"] = [
            {
                "role": "system" if m.role == "developer" else m.role,
                "content": m.text(),
            }
            for m in request.messages
        ]
        tokens = request.max_tokens or request.max_completion_tokens
    else:
        assert isinstance(request, CompletionRequest)
        job["prompt"] = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        # OpenAI's completions default to 16 tokens.
        tokens = request.max_tokens or 16
    if tokens is not None:
        job["max_new_tokens"] = tokens
    for field in ("temperature", "top_p", "seed"):
        if getattr(request, field) is not None:
            job[field] = getattr(request, field)
    if request.stop is not None:
        job["stop"] = [request.stop] if isinstance(request.stop, str) else request.stop
    return job


# --- the job ------------------------------------------------------------------------------

#: The parameter a field of the job comes from, by route (the rest keep their names).
_PARAMS = {
    IMAGES: {"width": "size", "height": "size", "num_outputs": "n"},
    CHAT: {"max_new_tokens": "max_tokens"},
    COMPLETIONS: {"max_new_tokens": "max_tokens"},
}


def param_for(url: str, field: str, body: dict[str, Any]) -> str:
    """The parameter the client wrote for ``field`` of the job made from ``body``."""
    name = field.removeprefix("input.")
    head, dot, rest = name.partition(".")
    head, bracket, index = head.partition("[")
    param = _PARAMS[url].get(head, head)
    if param == "max_tokens" and url == CHAT and body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        param = "max_completion_tokens"
    return param + (f"[{index}" if bracket else "") + (f".{rest}" if dot else "")


_JOB = TypeAdapter(JobCreate)


def job_for(url: str, body: dict[str, Any], settings: Settings, *, parsed: BaseModel | None = None) -> Any:
    """The ``JobCreate`` for ``body`` sent to ``url`` (one of ``IMAGES``, ``CHAT``,
    ``COMPLETIONS``). A bad body raises an ``OpenAIError`` naming the parameter: 400 for a
    bad or unsupported value, 404 for a model this deployment does not serve. ``parsed``: the
    body as the route's own model already read it (a batch line's is read here)."""
    if url not in REQUESTS:
        raise invalid("url", f"Invalid URL {url!r}: expected one of {', '.join(REQUESTS)}")
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object")
    # 1. OpenAI's parameters.
    request = parsed
    if request is None:
        try:
            request = REQUESTS[url].model_validate(body)
        except ValidationError as error:
            raise from_validation(error.errors()) from None
    # 2. The model, one of this deployment's for the route's engine.
    engine = ENGINE_OF[url]
    model = request.model or settings.default_model(engine)  # type: ignore[attr-defined]
    known = settings.allowed_models(engine)
    if model not in known:
        raise model_not_found(model, known)
    # 3. The job, checked as every job is, its faults named by the parameters they came from.
    job_input = _image_job(request) if isinstance(request, ImageRequest) else _text_job(request)  # type: ignore[arg-type]
    try:
        job = _JOB.validate_python({"engine": engine, "model": model, "input": job_input})
    except ValidationError as error:
        raise from_validation(
            error.errors(), rename=lambda field: param_for(url, field.removeprefix(f"{engine}."), body)
        ) from None
    try:
        bounds.check_bounds(job, settings)
    except InputProblem as problem:
        raise invalid(param_for(url, problem.field, body), problem.message) from None
    return job


# --- the response -------------------------------------------------------------------------


def job_failure(record: dict[str, str]) -> OpenAIError:
    """The error for a job that ended without an output: its reason, with the job id. Retrying
    the same request answers the same job, so the client is told not to."""
    error = json.loads(record["error"]) if record.get("error") else {}
    kind, reason = error.get("type", "internal"), error.get("message", "no reason recorded")
    headers = {"x-should-retry": "false"}
    message = f"job {record['id']} {record['status']}: {reason}"
    if record.get("status") == "canceled" or kind == "canceled":
        return OpenAIError(400, message, type="invalid_request_error", code="job_canceled", headers=headers)
    if kind == "request":
        return OpenAIError(400, message, type="invalid_request_error", code="job_failed", headers=headers)
    return OpenAIError(500, message, type="server_error", code="job_failed", headers=headers)


def job_unfinished(record: dict[str, str], *, waited_s: float) -> OpenAIError:
    """The error for a job still queued or running after the wait: it goes on, and its id
    says where to get it (a retry of the same request waits on the same job)."""
    job_id = record["id"]
    message = (
        f"job {job_id} has not ended within {waited_s:g} s (it is {record.get('status', 'queued')}) and goes on: "
        f"GET /v1/jobs/{job_id} gives it, or retry this request to wait on it again"
    )
    return OpenAIError(504, message, type="server_error", code="job_timeout")


def finish_reason(output: dict[str, Any]) -> str:
    """OpenAI's ``finish_reason`` for a text job's output (``length`` or ``stop``)."""
    return "length" if output.get("finish_reason") == "length" else "stop"


def usage_of(output: dict[str, Any]) -> dict[str, int]:
    usage = output.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_for(
    url: str,
    record: dict[str, str],
    *,
    request_body: dict[str, Any],
    base_url: str,
    signer: UrlSigner,
    artifacts: ArtifactStore,
) -> dict[str, Any]:
    """The OpenAI response object for ``record``, the job made from ``request_body`` sent to
    ``url``, as the route answers it once the job ended. ``b64_json`` images are read from
    ``artifacts`` (a blocking read: call it off the event loop). Raises ``job_failure`` for a
    job that failed or was canceled, ``job_unfinished`` for one that has not ended."""
    status = record.get("status")
    if status in ("failed", "canceled"):
        raise job_failure(record)
    if status != "succeeded":
        raise job_unfinished(record, waited_s=0)
    output = json.loads(record["output"])
    created = int(float(record["created_at"]))
    if url == IMAGES:
        return _images_response(
            record, output, created, request_body=request_body, base_url=base_url, signer=signer, artifacts=artifacts
        )
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(output), "logprobs": None}
    if url == CHAT:
        choice["message"] = {"role": "assistant", "content": output.get("text", ""), "refusal": None}
        kind = "chat.completion"
    else:
        choice["text"] = output.get("text", "")
        kind = "text_completion"
    return {
        "id": record["id"],
        "object": kind,
        "created": created,
        "model": record["model"],
        "choices": [choice],
        "usage": usage_of(output),
        "system_fingerprint": None,
    }


def _images_response(
    record: dict[str, str],
    output: dict[str, Any],
    created: int,
    *,
    request_body: dict[str, Any],
    base_url: str,
    signer: UrlSigner,
    artifacts: ArtifactStore,
) -> dict[str, Any]:
    images = output.get("images") or []
    data: list[dict[str, Any]] = []
    if request_body.get("response_format") == "b64_json":
        for image in images:
            key = artifact_name(image.get("url"))
            content = artifacts.get(key) if key else None
            if content is None:
                raise OpenAIError(500, f"job {record['id']}: an image's bytes are no longer kept", code="artifact_missing")
            data.append({"b64_json": base64.b64encode(content).decode(), "revised_prompt": None})
    else:
        view = job_view(record, base_url=base_url, signer=signer)
        data = [{"url": image["url"], "revised_prompt": None} for image in (view["output"] or {}).get("images", [])]
    first = images[0] if images else {}
    response: dict[str, Any] = {"created": created, "data": data}
    if first:
        response["size"] = f"{first.get('width')}x{first.get('height')}"
        response["output_format"] = str(first.get("url", "")).rsplit(".", 1)[-1]
    return response
