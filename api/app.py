"""The FastAPI app: create, read, list and cancel jobs, serve artifacts, report health."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import redis
from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import Response

from blaze_jobs import audit, redis_config
from blaze_jobs.artifacts import artifact_store
from blaze_jobs.jobs import Job, JobCreate, JobPage, JobStatus, job_view
from blaze_jobs.keys import Keys
from blaze_jobs.records import CURSOR
from blaze_jobs.settings import ENGINES, Settings, get_settings
from blaze_jobs.store import AsyncJobStore

from . import (
    admin,
    artifacts,
    bounds,
    connections,
    console,
    creation,
    metrics,
    openai_batches,
    openai_files,
    openai_routes,
    problems,
    queues,
    replicate,
    waits,
    webhooks,
)
from .artifacts import signer_of
from .auth import Caller, warn_if_off
from .request_context import base_url
from .responses import JSONResponse

log = logging.getLogger("blaze_jobs.api.app")

PROBLEM = {
    "content": {problems.PROBLEM_JSON: {"schema": problems.PROBLEM_SCHEMA}},
    "description": "A problem+json body naming the fault.",
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API, configured by ``settings`` (by default the ``BLAZE_*`` environment)."""
    settings = settings or get_settings()
    warn_if_off(settings, log)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeouts = {"socket_timeout": settings.redis_timeout_s, "socket_connect_timeout": settings.redis_timeout_s}
        # One bounded pool that a burst waits for (long-polls and event streams take none).
        app.state.redis = connections.connect(settings)
        app.state.store = AsyncJobStore(app.state.redis, settings)
        # Refuse a Redis that would evict accepted jobs; warn about one that keeps none.
        redis_config.check_at_start(settings, log=log)
        # Artifacts are read in FastAPI's thread pool through the same store workers write with.
        app.state.artifacts = artifact_store(settings, redis.Redis.from_url(settings.redis_url, **timeouts))
        # What start-up made (modules, schemas, routes: ~80,000 objects) lives as long as the
        # process: move it out of the cyclic collector's reach. Requests in flight survive
        # into its oldest generation, whose full collections would otherwise walk it all again,
        # at about 100 µs per request under load.
        gc.collect()
        gc.freeze()
        flushing = asyncio.create_task(metrics.TALLY.flush_every(metrics.FLUSH_S)) if settings.metrics else None
        yield
        if flushing is not None:
            flushing.cancel()  # which flushes what the last requests recorded
            await asyncio.gather(flushing, return_exceptions=True)
        await app.state.redis.aclose()
        metrics.process_ended()

    app = FastAPI(
        title="Blaze Jobs",
        version="1",
        summary="An asynchronous job queue for generative AI.",
        lifespan=lifespan,
        responses={413: PROBLEM, 422: PROBLEM, 429: PROBLEM, 503: PROBLEM},
    )
    problems.install(app)
    bounds.install(app, settings)
    # Outermost: it sees every answer, the 413s and 500s of the layers above included.
    metrics.install(app, settings)

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=Job,
        responses={
            # The header is not a declared parameter: a fuzzer reusing one key for other bodies
            # would read its 422 as a valid request refused.
            200: {"description": "The job an earlier create with the same `Idempotency-Key` header made.", "model": Job},
            202: {"headers": {"Location": {"description": "The job's URL.", "schema": {"type": "string", "format": "uri"}}}},
            409: PROBLEM,
            429: PROBLEM,
        },
    )
    async def create_job(request: Request, caller: Caller, body: Annotated[JobCreate, Body()]) -> JSONResponse:
        """Accept a job: it is queued for a worker of its engine and answered at once."""
        record, created = await creation.create(request, caller, body)
        # With ``Prefer: wait=N``, answer once the job ends (within N seconds).
        record = await waits.wait_if_preferred(request, record)
        view = job_view(record, base_url=base_url(request), signer=signer_of(request))
        return JSONResponse(view, status_code=202 if created else 200, headers={"Location": view["urls"]["get"]})

    @app.get("/v1/jobs/{job_id}", response_model=Job, responses={404: PROBLEM})
    async def get_job(
        request: Request,
        caller: Caller,
        job_id: str,
        # Defaults, not Annotated: a bound read from `settings` cannot be named in an annotation.
        wait: float = Query(
            0,
            ge=0,
            le=settings.max_wait_s,
            description="Long-poll: answer as soon as the job ends, or after this many seconds (at most BLAZE_MAX_WAIT_S).",
        ),
    ) -> JSONResponse:
        """The job as it stands now; with `wait`, once it ends (or when the wait runs out)."""
        record = await waits.job_after_wait(request, job_id, wait, tenant=caller.tenant)
        return JSONResponse(job_view(record, base_url=base_url(request), signer=signer_of(request)))

    @app.get("/v1/jobs", response_model=JobPage)
    async def list_jobs(
        request: Request,
        caller: Caller,
        status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
        engine: Annotated[Literal[ENGINES] | None, Query(description="Only jobs of this engine.")] = None,  # type: ignore[valid-type]
        limit: int = Query(50, ge=1, le=settings.list_limit_max, description="Page size, at most BLAZE_LIST_LIMIT_MAX."),
        cursor: Annotated[str | None, Query(pattern=CURSOR.pattern, description="`next_cursor` of the previous page.")] = None,
    ) -> JSONResponse:
        """The caller's tenant's jobs, newest first, a page at a time."""
        records, next_cursor = await request.app.state.store.list(
            tenant=caller.tenant, status=status.value if status else None, engine=engine, limit=limit, cursor=cursor
        )
        root, signer = base_url(request), signer_of(request)
        return JSONResponse({"jobs": [job_view(r, base_url=root, signer=signer) for r in records], "next_cursor": next_cursor})

    @app.post("/v1/jobs/{job_id}/cancel", response_model=Job, responses={404: PROBLEM, 409: PROBLEM})
    async def cancel_job(request: Request, caller: Caller, job_id: str) -> JSONResponse:
        """Cancel a queued job (it never runs) or a running one (it stops at its next step).
        409 when the job already ended; 404 for another tenant's job, which stays as it is."""
        store: AsyncJobStore = request.app.state.store
        await store.cancel(job_id, tenant=caller.tenant)
        address = request.client.host if request.client else None
        try:
            await audit.record_async(store.redis, settings, key=caller, action="job.cancel", target=job_id, address=address)
        except redis.exceptions.RedisError as error:
            # The job is canceled already: a 503 now would have the client retry into a 409.
            log.error("job %s canceled by key %s, but its audit entry was not written: %s", job_id, caller.id, error)
        return JSONResponse(job_view(await store.get(job_id), base_url=base_url(request), signer=signer_of(request)))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The API process is up."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: PROBLEM})
    async def readyz(request: Request) -> Response:
        """Ready to accept jobs: Redis answers, takes writes, and will not evict them.
        `warnings` name what is unsafe but allowed, such as a Redis that persists nothing."""
        found = await redis_config.check_async(request.app.state.redis, probe_key=Keys(settings.redis_prefix).readyz)
        if not found.ready:
            why = found.problem or found.refusing or ""
            return problems.problem(503, "Not ready", why, headers={"Retry-After": str(problems.REFUSED_RETRY_AFTER_S)})
        return JSONResponse({"status": "ready", "warnings": list(found.warnings)})

    # Events, deliveries and the webhook secret: after the routes above, so that the create
    # route, the hot one, is matched first.
    app.include_router(openai_files.router)
    app.include_router(openai_batches.router)
    app.include_router(openai_routes.router)
    app.include_router(replicate.router)
    app.include_router(queues.router)
    app.include_router(waits.router)
    app.include_router(webhooks.router)
    app.include_router(artifacts.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    app.include_router(console.router)
    # Last: GET /v1/models/{id} and /v1/models/{org}/{name} (a model id with a slash) that no route above took.
    app.include_router(openai_routes.model_router)
    return app
