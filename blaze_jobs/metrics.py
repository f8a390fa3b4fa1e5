"""Every Prometheus metric Blaze Jobs exports, named in one place.

The API serves its metrics at ``/metrics`` in prometheus-client's multiprocess mode
(``api/metrics.py``), so ``blaze api --workers N`` reports one sum; an engine or webhook
worker is one process and serves its own registry on ``--metrics-port``. Names follow
Prometheus conventions: the ``blaze_`` prefix, base units (seconds, bytes), ``_total`` on
counters, and no job or tenant ids among the labels (their number has no bound).

Recording is off until a process turns it on (``enable``): the API does when
``BLAZE_METRICS`` is on, a worker when it serves ``--metrics-port``. Every place that records
asks ``enabled()`` first, so a process nobody scrapes pays nothing.

Every worker-side metric carries the ``engine`` label: a labelled metric writes nothing until
it is first used, so the API process, which imports this module too, never exports a zero for
a worker's counter.

A device's busy time is read from its ``BusyWindow`` when scraped (``watch_device``), the run
still going included: a generation that runs for minutes shows as it runs, not in one jump at
its end.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

#: Job times: from a few milliseconds (echo, cache hits) to the half hour a big image job may
#: wait or run.
JOB_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
#: HTTP request times: an API answer takes milliseconds; a long-poll or blocking create is
#: bounded by ``BLAZE_MAX_WAIT_S``.
REQUEST_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: Jobs per batch, up to the largest ``--max-batch`` a worker takes.
BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
FILL_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: How long a batch waited to form: bounded by ``--max-wait-ms``.
FORM_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
#: Webhook delivery times: a receiver answers in milliseconds, or the retries go on for about
#: a day (``BLAZE_WEBHOOK_RETRY_SCHEDULE``).
WEBHOOK_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 43200, 86400)

_on = False


def enable(on: bool = True) -> None:
    """Turn recording on (or off) in this process."""
    global _on
    _on = on


def enabled() -> bool:
    return _on


def multiprocess() -> bool:
    """Whether this process writes its values for a multiprocess collector (the API)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


# --- the API ------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "blaze_http_requests_total", "HTTP requests answered, by route template, method and status code.", ["route", "method", "code"]
)
HTTP_SECONDS = Histogram(
    "blaze_http_request_duration_seconds",
    "Time to answer an HTTP request (a stream: until its last byte).",
    ["route", "method"],
    buckets=REQUEST_SECONDS,
)
JOBS_CREATED = Counter("blaze_jobs_created_total", "Jobs accepted (queued or born cached), by surface.", ["engine", "surface"])
JOBS_REJECTED = Counter(
    "blaze_jobs_rejected_total",
    "Creates refused, by engine (empty when unknown) and reason: invalid (422, 404 model, 413), rate_limit, quota, backpressure.",
    ["engine", "reason"],
)
JOBS_CACHED = Counter("blaze_jobs_cached_total", "Creates answered from the result cache, no job run.", ["engine"])
STREAMS_OPEN = Gauge(
    "blaze_event_clients",
    "Clients waiting on a job now, by kind: sse (event streams) or long_poll (waits).",
    ["kind"],
    multiprocess_mode="livesum",
)

# --- jobs, in the workers -----------------------------------------------------------------
JOB_QUEUE_SECONDS = Histogram(
    "blaze_job_queue_wait_seconds",
    "Each attempt's wait: from the job's creation, or its last return to the queue, to the attempt's start on a worker.",
    ["engine", "model"],
    buckets=JOB_SECONDS,
)
JOB_RUN_SECONDS = Histogram(
    "blaze_job_run_seconds", "From a job's start on a worker to its end.", ["engine", "model"], buckets=JOB_SECONDS
)
JOBS_ENDED = Counter(
    "blaze_jobs_ended_total",
    "Jobs ended by a worker (or failed by the reaper after their last attempt), by final status.",
    ["engine", "status"],
)
JOB_RETRIES = Counter("blaze_job_retries_total", "Job attempts given another go, by reason.", ["engine", "reason"])
LEASES_REAPED = Counter(
    "blaze_leases_reaped_total", "Running jobs whose lease ran out, by the status they moved to.", ["engine", "to"]
)
MESSAGES_RESCUED = Counter(
    "blaze_messages_rescued_total", "Queued jobs found without a queue message (lost in flight) and queued again.", ["engine"]
)

# --- batches ------------------------------------------------------------------------------
BATCH_SIZE = Histogram("blaze_batch_size", "Jobs in each batch run.", ["engine"], buckets=BATCH_SIZES)
BATCH_FILL = Histogram(
    "blaze_batch_fill_ratio", "Jobs in a batch over --max-batch (engines that batch).", ["engine"], buckets=FILL_RATIOS
)
BATCH_FORM_SECONDS = Histogram(
    "blaze_batch_form_wait_seconds",
    "How long a batch's first job waited for the batch to be due (full, or --max-wait-ms reached).",
    ["engine"],
    buckets=FORM_SECONDS,
)
BATCH_DEVICE_SECONDS = Histogram("blaze_batch_device_seconds", "Device time each batch took.", ["engine"], buckets=JOB_SECONDS)
#: Brought up to date at each scrape by ``_DeviceBusy`` (``watch_device``), which exports it.
DEVICE_BUSY_SECONDS = Counter(
    "blaze_device_busy_seconds_total",
    "Time the device spent running jobs, overlapping runs once (rate() of it is the busy fraction).",
    ["engine"],
    registry=None,
)
DEVICE_BUSY_RATIO = Gauge(
    "blaze_device_busy_ratio", "Device time over wall time in the last minute.", ["engine"], multiprocess_mode="max"
)

# --- the circuit breaker --------------------------------------------------------------------
BREAKER_STATE = Gauge(
    "blaze_breaker_state", "1 for the breaker's current state (closed, open, half_open), 0 for the others.", ["engine", "state"]
)
BREAKER_TRANSITIONS = Counter("blaze_breaker_transitions_total", "Breaker state changes, by the state entered.", ["engine", "to"])

# --- the result cache ---------------------------------------------------------------------
CACHE_LOOKUPS = Counter(
    "blaze_cache_lookups_total",
    "Result-cache lookups, by engine, layer (local, redis, in_flight) and result (hit, miss).",
    ["engine", "layer", "result"],
)

# --- webhooks -------------------------------------------------------------------------------
WEBHOOK_DELIVERIES = Counter(
    "blaze_webhook_deliveries_total",
    "Webhook delivery attempts, by event and outcome (delivered, retry, refused, gone).",
    ["event", "outcome"],
)
WEBHOOK_LATENCY = Histogram(
    "blaze_webhook_delivery_latency_seconds",
    "From an event to its webhook's acceptance by the receiver, retries included.",
    ["event"],
    buckets=WEBHOOK_SECONDS,
)
WEBHOOK_EXHAUSTED = Counter(
    "blaze_webhook_retries_exhausted_total", "Webhook deliveries given up after their last attempt.", ["event"]
)


class BusyWindow:
    """The device's busy time, in all (``busy_s``) and as a share of the last ``window_s``
    seconds of wall time (``ratio``). The device is busy from a run's ``begin`` to its ``end``
    (a batch; a continuous engine's job; a job of an engine that never batches, on its task
    thread): runs that overlap count once, and one still going counts up to the read."""

    def __init__(self, *, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._spans: deque[tuple[float, float]] = deque()  # ended busy spans in the window
        self._running = 0
        self._open_since = 0.0  # since when the runs going now have kept the device busy
        self._ended_s = 0.0  # the ended spans' time, in all
        self._lock = threading.Lock()
        self._since = clock()

    def begin(self) -> None:
        with self._lock:
            if self._running == 0:
                self._open_since = self._clock()
            self._running += 1

    def end(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                now = self._clock()
                self._spans.append((self._open_since, now))
                self._ended_s += now - self._open_since
                self._forget(now - self.window_s)

    def busy_s(self) -> float:
        """Seconds the device has been busy since this window was made."""
        with self._lock:
            return self._ended_s + (self._clock() - self._open_since if self._running else 0.0)

    def ratio(self) -> float:
        with self._lock:
            now = self._clock()
            low = max(now - self.window_s, self._since)
            if now <= low:
                return 0.0
            self._forget(low)
            busy = sum(end - max(start, low) for start, end in self._spans)
            if self._running:
                busy += now - max(self._open_since, low)
        return min(1.0, busy / (now - low))

    def _forget(self, low: float) -> None:
        while self._spans and self._spans[0][1] <= low:
            self._spans.popleft()


class _DeviceBusy(Collector):
    """Exports ``DEVICE_BUSY_SECONDS``, first brought up to each watched window's busy time."""

    def __init__(self) -> None:
        self._windows: dict[str, BusyWindow] = {}
        self._counted: dict[str, float] = {}
        self._lock = threading.Lock()

    def watch(self, engine: str, window: BusyWindow) -> None:
        with self._lock:
            self._windows[engine] = window
            self._counted[engine] = 0.0

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            for engine, window in self._windows.items():
                busy = window.busy_s()
                DEVICE_BUSY_SECONDS.labels(engine).inc(max(0.0, busy - self._counted[engine]))
                self._counted[engine] = busy
        yield from DEVICE_BUSY_SECONDS.collect()


_device_busy = _DeviceBusy()
REGISTRY.register(_device_busy)


def watch_device(engine: str, window: BusyWindow) -> None:
    """Export ``window`` as ``engine``'s device busy time and ratio, read at each scrape."""
    _device_busy.watch(engine, window)
    DEVICE_BUSY_RATIO.labels(engine).set_function(window.ratio)
