"""The API's Prometheus metrics: every request counted and timed by its route's template,
and ``GET /metrics`` answering them with the queue gauges read from Redis.

``blaze api`` runs prometheus-client in multiprocess mode (``api/__main__.py`` names the
folder its processes write their values in), so ``--workers N`` reports one sum whichever
process a scrape reaches. The queues' depth and oldest job's age are cluster-wide: read from
Redis at a scrape, at most about once a second per process, and left out while Redis is
unreachable (the rest still answers). With ``BLAZE_METRICS=off`` nothing is recorded and
``/metrics`` is a 404.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis.exceptions
from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blaze_jobs import metrics
from blaze_jobs.keys import WEBHOOK_QUEUE, Keys
from blaze_jobs.settings import ENGINES, Settings

from .connections import Busy
from .request_context import settings_of

if TYPE_CHECKING:
    from .queues import QueueHead

log = logging.getLogger("blaze_jobs.api.metrics")

#: The route label of a request no route took: one value, never the raw path (a client may
#: send any number of paths).
UNMATCHED = "unmatched"
#: The methods labelled by name; any other (a client may send any token) is ``other``.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The routes that make a job, by method and template: their 422s (an OpenAI route's 400s)
#: are creates rejected as invalid.
CREATE_ROUTES = frozenset(
    ("POST", path)
    for path in (
        "/v1/jobs",
        "/v1/predictions",
        "/v1/models/blaze/{name}/predictions",
        "/v1/images/generations",
        "/v1/chat/completions",
        "/v1/completions",
    )
)
INVALID_CODES = frozenset({400, 422})
#: How long one process answers the queue gauges it read last: a scrape every few seconds
#: (or several Prometheus servers) costs Redis two round trips a second at most.
QUEUES_FRESH_S = 1.0

router = APIRouter()


def install(app: FastAPI, settings: Settings) -> None:
    """Turn recording on or off as ``settings.metrics`` says; when on, count and time every
    request. ``router`` serves ``GET /metrics`` (no key needed, as for ``/healthz``)."""
    metrics.enable(settings.metrics)
    if settings.metrics:
        app.add_middleware(RequestMetrics)


def route_of(scope: Scope) -> str:
    """The template of the route that took the request (``/v1/jobs/{job_id}``), as the router
    left it in the scope; ``UNMATCHED`` when none did."""
    route = scope.get("route")
    return getattr(route, "path_format", None) or UNMATCHED


def create_route(scope: Scope) -> bool:
    """Whether the request went to a route that makes a job."""
    return (scope.get("method"), route_of(scope)) in CREATE_ROUTES


def rejected(engine: str, reason: str) -> None:
    """Count a create refused for ``reason`` (invalid, rate_limit, quota, backpressure)."""
    if metrics.enabled():
        metrics.JOBS_REJECTED.labels(engine, reason).inc()


class RequestMetrics:
    """ASGI middleware: each request counted by route template, method and status code, and
    timed until its answer's last byte (an event stream's too). Plain ASGI: Starlette's
    ``BaseHTTPMiddleware`` costs the create path several times more."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        #: The counter's and histogram's children by (route, method, code): ``labels()`` takes
        #: a lock and builds a key each call; the set of keys is bounded by the routes.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        done = False

        async def send_timed(message: Message) -> None:
            nonlocal status, done
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif kind == "http.response.body" and not message.get("more_body", False) and not done:
                await send(message)
                done = True
                self.record(scope, status, time.perf_counter() - start)
                return
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            if not done:  # the client left mid-answer, or the app raised before answering
                self.record(scope, status or 500, time.perf_counter() - start)

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        route = route_of(scope)
        method = scope["method"] if scope["method"] in METHODS else "other"
        children = self._children.get((route, method, status))
        if children is None:
            children = self._children[(route, method, status)] = (
                metrics.HTTP_REQUESTS.labels(route, method, str(status)),
                metrics.HTTP_SECONDS.labels(route, method),
            )
        children[0].inc()
        children[1].observe(seconds)
        if status in INVALID_CODES and (method, route) in CREATE_ROUTES:
            rejected("", "invalid")


class QueueGauges:
    """A collector of the queue gauges as last read (``queue_heads``)."""

    def __init__(self, heads: list[QueueHead], *, now: float) -> None:
        self.heads, self.now = heads, now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("blaze_queue_depth", "Messages waiting in each queue.", labels=["engine"])
        age = GaugeMetricFamily(
            "blaze_queue_oldest_age_seconds",
            "Seconds the job at each queue's head has waited (0 for an empty queue).",
            labels=["engine"],
        )
        for head in self.heads:
            depth.add_metric([head.name], head.depth)
            if head.depth == 0:
                age.add_metric([head.name], 0.0)
            elif head.created_at is not None:
                age.add_metric([head.name], max(0.0, self.now - head.created_at))
        yield depth
        yield age


async def queues_now(app: FastAPI) -> list[QueueHead] | None:
    """Every engine's queue and the webhooks queue, read at most every ``QUEUES_FRESH_S`` by
    this process; None while Redis cannot be read."""
    read_at, heads = getattr(app.state, "queue_heads", (0.0, None))
    if time.monotonic() - read_at < QUEUES_FRESH_S:
        return heads
    # Imported here: the queue routes import the problem answers, which count refusals here.
    from .queues import queue_heads

    keys = Keys(settings_of(app).redis_prefix)
    try:
        heads = await queue_heads(app.state.redis, keys, (*ENGINES, WEBHOOK_QUEUE))
    except (redis.exceptions.RedisError, Busy) as error:
        log.warning("queue gauges left out of /metrics: %s", error)
        heads = None
    app.state.queue_heads = (time.monotonic(), heads)
    return heads


@router.get("/metrics", include_in_schema=False)
async def scrape(request: Request) -> Response:
    """What Prometheus scrapes: every process's metrics and the queue gauges (with
    ``BLAZE_METRICS_TOKEN`` set, for that Bearer token only)."""
    settings = settings_of(request.app)
    if not settings.metrics:
        raise HTTPException(404, "Not Found")  # as for any path no route takes
    if settings.metrics_token and not hmac.compare_digest(
        request.headers.get("authorization", "").encode(), f"Bearer {settings.metrics_token}".encode()
    ):
        raise HTTPException(401, "/metrics needs Authorization: Bearer <BLAZE_METRICS_TOKEN>", {"WWW-Authenticate": "Bearer"})
    heads = await queues_now(request.app)
    # Reading every process's files and writing the text takes milliseconds (tens with many
    # series): in a thread, so the event loop goes on answering meanwhile.
    body = await run_in_threadpool(exposition, heads)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def exposition(heads: list[QueueHead] | None) -> bytes:
    """Every process's metrics (or this one's), and the queue gauges when they were read."""
    if metrics.multiprocess():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    if heads is not None:
        queues = CollectorRegistry(auto_describe=False)
        queues.register(QueueGauges(heads, now=time.time()))
        body += generate_latest(queues)
    return body


def process_ended() -> None:
    """At an API process's exit: its live gauges (open event streams) leave the sum."""
    if metrics.multiprocess():
        mark_process_dead(os.getpid())
