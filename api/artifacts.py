"""``GET /v1/artifacts/{key}``: the files jobs produced, by content address.

A job view's artifact URLs are signed (``blaze_jobs.artifacts.UrlSigner``): a valid, unexpired
signature serves the bytes to anyone, so a browser, a webhook receiver or ``curl`` needs no
key. Without a signature the caller needs a key of a tenant that owns a job pointing at the
artifact; to any other the artifact does not exist (404), so a guessed or reused content hash
reads nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import redis
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from blaze_jobs.artifacts import CONTENT_TYPES, KEY_PATTERN, UrlSigner, content_type, url_signer
from blaze_jobs.keys import Keys

from . import problems
from .auth import authenticated
from .problems import PROBLEM_JSON, PROBLEM_SCHEMA
from .request_context import settings_of

log = logging.getLogger("blaze_jobs.api.artifacts")

PROBLEM = {"content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}, "description": "A problem+json body naming the fault."}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the artifact URL secret once, at start (a Redis down now: at first use)."""
    settings = settings_of(app)
    timeouts = {"socket_timeout": settings.redis_timeout_s, "socket_connect_timeout": settings.redis_timeout_s}
    app.state.signer_redis = redis.Redis.from_url(settings.redis_url, **timeouts)
    try:
        await run_in_threadpool(url_signer, app.state.signer_redis, settings)
    except redis.RedisError as error:
        log.warning("could not read the artifact URL secret (%s); reading it again at first use", error)
    yield
    app.state.signer_redis.close()


router = APIRouter(lifespan=lifespan)


def signer_of(request: Request) -> UrlSigner:
    """The deployment's artifact URL signer, as loaded at start (a dictionary look-up)."""
    return url_signer(request.app.state.signer_redis, settings_of(request.app))


def _not_found(key: str) -> Response:
    return problems.problem(404, "Artifact not found", f"no artifact {key!r} (or its retention ran out)")


@router.get(
    "/v1/artifacts/{key}",
    responses={
        200: {"content": {kind: {} for kind in CONTENT_TYPES.values()}},
        401: PROBLEM,
        403: PROBLEM,
        404: PROBLEM,
    },
    response_class=Response,
)
async def get_artifact(
    request: Request,
    key: str,
    expires: Annotated[str | None, Query(description="A signed URL's expiry, in Unix seconds.")] = None,
    signature: Annotated[str | None, Query(description="A signed URL's signature, as a job view gives it.")] = None,
) -> Response:
    """A file a job produced, by its content address. With the `expires` and `signature` of
    a job view's URL, anyone may fetch it until it expires (403 once it has, or when the
    signature does not match); without them, only a key of a tenant that owns a job showing
    it (401 without a key, 404 for any other tenant)."""
    if signature is not None or expires is not None:
        verdict = signer_of(request).check(key, expires=expires, signature=signature or "")
        if verdict == "tampered":
            return problems.problem(403, "Invalid signature", "the URL's signature does not match its artifact and expiry")
        if verdict == "expired":
            return problems.problem(403, "Signature expired", "the URL's signature expired with its job's retention")
        assert expires is not None  # a valid verdict read it
        # Shared caches may keep it as long as the signature lasts, and no longer.
        cache_control = f"public, max-age={max(0, int(expires) - int(time.time()))}"
    else:
        caller = await authenticated(request)
        settings = settings_of(request.app)
        owners = Keys(settings.redis_prefix).artifact_owners(key)
        if not KEY_PATTERN.fullmatch(key) or not await request.app.state.redis.sismember(owners, caller.tenant):
            return _not_found(key)
        # Content-addressed, so the bytes never change; but fetched with a key, so only the
        # caller's own cache keeps them.
        cache_control = f"private, max-age={settings.job_ttl_s}"
    data = await run_in_threadpool(request.app.state.artifacts.get, key) if KEY_PATTERN.fullmatch(key) else None
    if data is None:
        return _not_found(key)
    return Response(data, media_type=content_type(key), headers={"Cache-Control": cache_control})
