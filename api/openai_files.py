"""OpenAI's Files API: ``POST /v1/files`` (multipart ``file`` and ``purpose``), ``GET
/v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE
/v1/files/{id}``, for a tenant's batch input and the output and error files its batches
write (``blaze_jobs.files``). Errors are in OpenAI's shape."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from blaze_jobs import files
from blaze_jobs.files import FileNotFound, FileQuotaFull

from . import openai_retries
from .auth import Caller
from .openai_errors import OpenAIError, OpenAIRoute, invalid
from .openai_routes import ERROR, ERRORS
from .request_context import settings_of
from .responses import JSONResponse

router = APIRouter(route_class=OpenAIRoute, tags=["OpenAI files"])
#: The bounds OpenAI puts on ``expires_after[seconds]``: an hour to thirty days.
EXPIRES_AFTER_S = (3600, 2_592_000)


def list_page(data: list[dict[str, Any]], more: bool) -> JSONResponse:
    """A page of a list as OpenAI's client pages it (``SyncCursorPage``: the next page starts
    ``after`` the last item's id, while ``has_more``)."""
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }
    )


def not_found(file_id: str) -> OpenAIError:
    return OpenAIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")


async def expires_after(request: Request) -> int:
    """The ``expires_after[seconds]`` the client's ``expires_after={"anchor": "created_at",
    "seconds": N}`` sends beside the file (read off the form: the OpenAPI document leaves it
    out, as a form field named with brackets), or as long as files are kept."""
    sent = (await request.form()).get("expires_after[seconds]")
    if sent is None:
        return settings_of(request.app).file_ttl_s
    low, high = EXPIRES_AFTER_S
    if not isinstance(sent, str) or not sent.strip().isdigit() or not low <= int(sent) <= high:
        raise invalid("expires_after.seconds", f"must be a whole number of seconds within [{low}, {high}]")
    return int(sent)


@router.post("/v1/files", responses={**ERRORS, 413: ERROR})
async def create_file(
    request: Request,
    caller: Caller,
    file: Annotated[UploadFile, File(description="The file: for `batch`, JSONL of request lines.")],
    purpose: Annotated[Literal["batch", "user_data"], Form(description="`batch` (a batch's input) or `user_data`.")],
) -> JSONResponse:
    """Upload a file, kept for BLAZE_FILE_TTL_S (or `expires_after[seconds]`, if sooner)."""
    settings = settings_of(request.app)
    ttl_s = min(settings.file_ttl_s, await expires_after(request))
    content = await file.read()
    if len(content) > settings.file_max_bytes:
        raise OpenAIError(
            413, f"the file is {len(content)} bytes; the limit is {settings.file_max_bytes}", param="file", code="file_too_large"
        )
    client = request.app.state.store.redis
    # The client retries an upload whose answer it lost: the retry answers the file it made.
    retried = {"purpose": purpose, "filename": file.filename or "", "sha256": hashlib.sha256(content).hexdigest()}
    earlier = await openai_retries.earlier_job(request, caller, "/v1/files", retried)
    if earlier is not None:
        try:
            return JSONResponse(files.file_view(await files.describe(client, settings, earlier, tenant=caller.tenant)))
        except FileNotFound:
            pass
    try:
        meta = await files.put(
            client,
            settings,
            ttl_s=ttl_s,
            tenant=caller.tenant,
            filename=file.filename or "upload",
            purpose=purpose,
            content=content,
        )
    except FileQuotaFull as full:
        # 413, not 429: the client does not retry it, and waiting does not help (deleting does).
        raise OpenAIError(413, f"{full}; delete files to make room", param="file", code="file_quota_exceeded") from None
    await openai_retries.remember(request, caller, "/v1/files", retried, meta["id"])
    return JSONResponse(files.file_view(meta))


@router.get("/v1/files", responses=ERRORS)
async def list_files(
    request: Request,
    caller: Caller,
    after: Annotated[str | None, Query(max_length=64, description="The id of the last file of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Page size.")] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query(description="By creation time.")] = "desc",
    purpose: Annotated[str | None, Query(max_length=64, description="Only files of this purpose.")] = None,
) -> JSONResponse:
    """The tenant's files, a page at a time (`after` the last id of the previous page)."""
    settings = settings_of(request.app)
    found, more = await files.page(
        request.app.state.store.redis, settings, tenant=caller.tenant, after=after, limit=limit, purpose=purpose, order=order
    )
    data = [files.file_view(meta) for meta in found]
    return list_page(data, more)


@router.get("/v1/files/{file_id}", responses=ERRORS)
async def get_file(request: Request, caller: Caller, file_id: str) -> JSONResponse:
    """The file's description."""
    try:
        meta = await files.describe(request.app.state.store.redis, settings_of(request.app), file_id, tenant=caller.tenant)
    except FileNotFound:
        raise not_found(file_id) from None
    return JSONResponse(files.file_view(meta))


@router.get(
    "/v1/files/{file_id}/content",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes."}},
)
async def file_content(request: Request, caller: Caller, file_id: str) -> Response:
    """The file's bytes (a batch's output and error files are JSONL)."""
    try:
        content = await files.content(request.app.state.store.redis, settings_of(request.app), file_id, tenant=caller.tenant)
    except FileNotFound:
        raise not_found(file_id) from None
    return Response(content, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", responses=ERRORS)
async def delete_file(request: Request, caller: Caller, file_id: str) -> JSONResponse:
    """Delete the file (a batch made from it keeps running)."""
    try:
        await files.delete(request.app.state.store.redis, settings_of(request.app), file_id, tenant=caller.tenant)
    except FileNotFound:
        raise not_found(file_id) from None
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})
