"""The API's Prometheus metrics: every request counted and timed by its route's template,
and ``GET /metrics`` answering them with the queue gauges read from Redis.

``blaze api`` runs prometheus-client in multiprocess mode (``api/__main__.py`` names the
folder its processes write their values in), so ``--workers N`` reports one sum whichever
process a scrape reaches. The queues' depth and oldest job's age are cluster-wide: read from
Redis at a scrape, at most about once a second per process, one read at a time, and left
out of a scrape while Redis is unreachable or slower than ``QUEUES_WAIT_S`` (the rest still
answers). With ``BLAZE_METRICS=off`` nothing is recorded and ``/metrics`` is a 404.

What every request records (its count and time, a create's count) is kept in the process's
memory (``TALLY``) and written to its multiprocess values every ``FLUSH_S``, at a scrape it
answers and at its exit: a request costs a dict update, not four locked writes to mmapped
files, and a scrape another process answers sees this one's requests at most ``FLUSH_S`` late.
"""

from __future__ import annotations

import asyncio
import bisect
import glob
import hmac
import logging
import os
import re
import threading
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
from starlette.routing import compile_path
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
#: The routes that make a job, by method and template: their answers of ``INVALID_CODES`` are
#: creates rejected as invalid, unless the route got to a job (``job_answered``).
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
#: A body too large (413), a model not served (an OpenAI or Replicate route's 404), bad input
#: (422, an OpenAI route's 400).
INVALID_CODES = frozenset({400, 404, 413, 422})
#: The keys the create path leaves in the request's ``scope["state"]`` for ``RequestMetrics``:
#: the engine once known, and that the request got to a job (made, or an earlier one found).
ENGINE_STATE = "blaze_metrics_engine"
JOB_STATE = "blaze_metrics_job"
#: How long one process answers the queue gauges it read last: a scrape every few seconds
#: (or several Prometheus servers) costs Redis two round trips and a ZCARD a second at most.
QUEUES_FRESH_S = 1.0
#: How long a scrape waits for the queue gauges: with Redis slow (a connection waited for up
#: to ``BLAZE_REDIS_POOL_WAIT_S``, commands retried), the rest of ``/metrics`` still answers
#: well within Prometheus's 10 s scrape timeout, without them.
QUEUES_WAIT_S = 1.0
#: How often an API process writes what its requests recorded to its multiprocess values.
FLUSH_S = 1.0

router = APIRouter()


class Tally:
    """Counts and observations of prometheus-client children (a counter's, a histogram's)
    kept in memory, and added to the children by ``flush``. A histogram's pending
    observations are its sum and a count per bucket, written as its own ``observe`` writes
    them (the first bucket whose bound is at least the value), to the values it keeps them in
    (``_upper_bounds``, ``_buckets``, ``_sum``: prometheus-client has no public call that adds
    many observations at once; tests/test_tally.py compares the samples with direct recording,
    so a release that changes them fails there)."""

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}
        self._observed: dict[Any, list[float]] = {}  # a child: [sum, count in each bucket]
        # Recording and flushing run on the event loop today; the lock keeps a count made from
        # a thread (a sync route, say) from landing in a dict that a flush has already taken.
        self._lock = threading.Lock()

    def inc(self, child: Any, amount: float = 1.0) -> None:
        with self._lock:
            self._counts[child] = self._counts.get(child, 0.0) + amount

    def observe(self, child: Any, value: float) -> None:
        with self._lock:
            pending = self._observed.get(child)
            if pending is None:
                pending = self._observed[child] = [0.0] * (len(child._upper_bounds) + 1)
            pending[0] += value
            pending[1 + bisect.bisect_left(child._upper_bounds, value)] += 1

    def flush(self) -> None:
        """Add what was kept to the children (to the files of multiprocess mode)."""
        with self._lock:
            counts, self._counts = self._counts, {}
            observed, self._observed = self._observed, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, (total, *buckets) in observed.items():
            child._sum.inc(total)
            for bucket, count in zip(child._buckets, buckets, strict=True):
                if count:
                    bucket.inc(count)

    async def flush_every(self, seconds: float) -> None:
        """Flush every ``seconds``, until cancelled (flushing once more then)."""
        try:
            while True:
                await asyncio.sleep(seconds)
                self.flush()
        finally:
            self.flush()


#: What this process's requests recorded, not yet in its prometheus-client values.
TALLY = Tally()


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


def engine_of(scope: Scope, *, route: str | None = None) -> str:
    """The engine a create asked for, as far as known: noted by the create path
    (``note_engine``), implied by its route (``route``, or the one that took it), or "" (the
    body was not read, or named none)."""
    # Imported here: the OpenAI bodies import the problem answers, which count refusals here.
    from .openai_bodies import ENGINE_OF

    state = scope.get("state") or {}
    return state.get(ENGINE_STATE) or ENGINE_OF.get(route or route_of(scope), "")


def note_engine(scope: Scope, engine: str) -> None:
    """The create ``scope`` serves asks for ``engine``: its refusal is counted under it."""
    scope.setdefault("state", {})[ENGINE_STATE] = engine


def job_answered(scope: Scope) -> None:
    """The create ``scope`` serves got to its job: whatever it answers from now on (an OpenAI
    route's 400 for a job that failed) is the job's outcome, not a refused create."""
    scope.setdefault("state", {})[JOB_STATE] = True


def rejected(engine: str, reason: str, count: int = 1) -> None:
    """Count ``count`` creates refused for ``reason`` (invalid, rate_limit, quota, backpressure)."""
    if metrics.enabled():
        metrics.JOBS_REJECTED.labels(engine, reason).inc(count)


def _create_route_by_path(scope: Scope) -> tuple[str, str] | None:
    # A body declared too large is refused (413) before the router sees the request: which
    # create route its path is, if any, is read from the path here.
    return next((key for key, pattern in _CREATE_PATHS if key[0] == scope.get("method") and pattern.match(scope["path"])), None)


_CREATE_PATHS = [(key, compile_path(key[1])[0]) for key in CREATE_ROUTES]


class RequestMetrics:
    """ASGI middleware: each request counted by route template, method and status code, and
    timed until the app is done with it: its answer's last byte sent (no route runs work after
    answering), an event stream's too. Plain ASGI: Starlette's ``BaseHTTPMiddleware`` costs
    the create path several times more."""

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
        answer = _Status(send)
        try:
            await self.app(scope, receive, answer.send)
        finally:
            # No status sent: the app raised before answering, or the client left first.
            self.record(scope, answer.status or 500, time.perf_counter() - start)

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        route = route_of(scope)
        method = scope["method"] if scope["method"] in METHODS else "other"
        children = self._children.get((route, method, status))
        if children is None:
            children = self._children[(route, method, status)] = (
                metrics.HTTP_REQUESTS.labels(route, method, str(status)),
                metrics.HTTP_SECONDS.labels(route, method),
            )
        TALLY.inc(children[0])
        TALLY.observe(children[1], seconds)
        if status in INVALID_CODES and not (scope.get("state") or {}).get(JOB_STATE):
            if (method, route) in CREATE_ROUTES:
                rejected(engine_of(scope), "invalid")
            elif status == 413 and route == UNMATCHED and (found := _create_route_by_path(scope)):
                rejected(engine_of(scope, route=found[1]), "invalid")


class _Status:
    """The status code of the answer sent through ``send`` (0 until its start is sent)."""

    __slots__ = ("_send", "status")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


class QueueGauges:
    """A collector of the queue gauges as last read (``queue_heads``), and of the webhook
    deliveries in the retries set (None: not read)."""

    def __init__(self, heads: list[QueueHead], *, retries: int | None, now: float) -> None:
        self.heads, self.retries, self.now = heads, retries, now

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
        if self.retries is not None:
            yield GaugeMetricFamily(
                "blaze_webhook_retries_waiting",
                "Webhook deliveries in the retries set: waiting for a retry, or in flight on a webhook worker.",
                value=self.retries,
            )


#: What a scrape reads from Redis: the queues' heads and the retries set's size.
QueueReading = tuple[list["QueueHead"], int]


async def queues_now(app: FastAPI) -> QueueReading | None:
    """Every engine's queue and the webhooks queue, and the webhook retries waiting, read at
    most every ``QUEUES_FRESH_S`` by this process, one read at a time however many scrapes
    wait for it; None while Redis cannot be read, or has not answered within
    ``QUEUES_WAIT_S`` (the read goes on, and a later scrape answers it)."""
    read_at, reading = getattr(app.state, "queue_reading", (-QUEUES_FRESH_S, None))
    if time.monotonic() - read_at < QUEUES_FRESH_S:
        return reading
    task: asyncio.Task[QueueReading | None] | None = getattr(app.state, "queue_read", None)
    if task is None or task.done():
        task = app.state.queue_read = asyncio.ensure_future(_read_queues(app))
    try:
        # Shielded: a scrape that gives up (or is cut) leaves the read to the next one.
        return await asyncio.wait_for(asyncio.shield(task), QUEUES_WAIT_S)
    except TimeoutError:
        log.warning("queue gauges left out of /metrics: Redis did not answer within %g s", QUEUES_WAIT_S)
        return None


async def _read_queues(app: FastAPI) -> QueueReading | None:
    # Imported here: the queue routes import the problem answers, which count refusals here.
    from .queues import queue_heads

    keys = Keys(settings_of(app).redis_prefix)
    client = app.state.redis
    reading: QueueReading | None
    try:
        # The retries set's size on a connection of its own, beside the queues' two round trips.
        heads, retries = await asyncio.gather(
            queue_heads(client, keys, (*ENGINES, WEBHOOK_QUEUE)), client.zcard(keys.webhook_retries)
        )
        reading = (heads, int(retries))
    except (redis.exceptions.RedisError, Busy) as error:
        log.warning("queue gauges left out of /metrics: %s", error)
        reading = None
    app.state.queue_reading = (time.monotonic(), reading)
    return reading


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
    reading = await queues_now(request.app)
    TALLY.flush()  # this process's answers so far, the scrape's own excepted
    # Reading every process's files and writing the text takes milliseconds (tens with many
    # series): in a thread, so the event loop goes on answering meanwhile.
    body = await run_in_threadpool(exposition, reading)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def exposition(reading: QueueReading | None) -> bytes:
    """Every process's metrics (or this one's), and the queue gauges when they were read."""
    if metrics.multiprocess():
        forget_dead_processes(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    if reading is not None:
        queues = CollectorRegistry(auto_describe=False)
        queues.register(QueueGauges(reading[0], retries=reading[1], now=time.time()))
        body += generate_latest(queues)
    return body


def process_ended() -> None:
    """At an API process's exit: its live gauges (open event streams) leave the sum."""
    if metrics.multiprocess():
        mark_process_dead(os.getpid())


#: A live gauge's file in the multiprocess folder: ``gauge_<mode>_<pid>.db``.
LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def forget_dead_processes(folder: str) -> None:
    """Take out of the sums the live gauges (open event streams) of API processes that ended
    without saying so: killed (SIGKILL, out of memory, uvicorn's supervisor ending a hung
    worker), which ``process_ended`` never ran for."""
    pids = {
        int(found[1])
        for path in glob.glob(os.path.join(folder, "gauge_live*.db"))
        if (found := LIVE_GAUGE_FILE.search(os.path.basename(path)))
    }
    for pid in pids:
        if not alive(pid):
            mark_process_dead(pid, folder)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (another user's counts: it is no API process of ours to forget)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
