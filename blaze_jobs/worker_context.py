"""What a worker process loads once and every job it runs shares: its ``WorkerContext``
(settings, Redis, the engine, the batcher, the breaker, the heartbeat), one per engine; and
the ``--metrics-port`` both worker entry points (engines, webhooks) serve their metrics on."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import prometheus_client
import redis
from redis.backoff import ExponentialBackoff

from blaze_jobs import cache, metrics
from blaze_jobs.artifacts import ArtifactStore, artifact_store
from blaze_jobs.batching import Batcher
from blaze_jobs.breaker import CircuitBreaker
from blaze_jobs.engines import create_engine
from blaze_jobs.engines.base import Engine
from blaze_jobs.errors import HandedBack
from blaze_jobs.heartbeat import Heartbeat
from blaze_jobs.redis_config import WaitingRetry
from blaze_jobs.settings import Settings, get_settings
from blaze_jobs.store import JobStore

log = logging.getLogger("blaze_jobs.worker")


class WorkerContext:
    """What one worker process loads once for its engine and every job it runs shares:
    settings, Redis, the engine, the batcher, the breaker, the heartbeat."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: str,
        device: str | None = None,
        name: str | None = None,
        max_batch: int | None = None,
        max_wait_ms: float | None = None,
        on_open: Callable[[], None] = lambda: None,
        on_half_open: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.engine_name = engine
        self.device = device or settings.device
        self.name = name or f"{engine}-{os.getpid()}@{socket.gethostname()}"
        # A worker rides out a Redis restart: each command retries with back-off for about a
        # minute instead of failing the job it was recording.
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=10,
            # ... and a Redis at its memory limit, the same way (redis_config.WaitingRetry).
            retry=WaitingRetry(ExponentialBackoff(cap=1.0, base=0.05), settings.worker_redis_retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
        )
        self.store = JobStore(self.redis, settings)
        self.artifacts: ArtifactStore = artifact_store(settings, self.redis)
        self.engine: Engine = create_engine(engine, settings, device=self.device, max_batch=max_batch)
        self.local_cache = cache.LocalCache(entries=settings.cache_local_entries, ttl_s=settings.cache_ttl_s)
        self.cache_keys = cache.CacheKeys(settings.redis_prefix)
        self.inflight = cache.InFlight()
        self.jobs_run = 0
        self.batched_jobs = 0
        self.batcher = Batcher(
            self.engine,
            max_batch=max_batch or settings.max_batch,
            max_wait_ms=settings.max_wait_ms if max_wait_ms is None else max_wait_ms,
            on_batch=self._count_batch,
        )
        if metrics.enabled():
            # Read at each scrape, so it is as fresh as the scrape, at no cost between scrapes.
            metrics.watch_device(engine, self.batcher.busy)

        def opened() -> None:
            # Jobs waiting for the device go back to the queue for the worker's peers at once.
            self.batcher.fail_waiting(HandedBack("the worker's breaker opened"))
            on_open()

        self.breaker = CircuitBreaker(
            failures=settings.breaker_failures,
            cooldown_s=settings.breaker_cooldown_s,
            engine=engine,
            max_cooldown_s=settings.breaker_max_cooldown_s,
            on_open=opened,
            on_half_open=on_half_open,
            # GET /v1/workers shows each breaker change at once, not at the next beat.
            on_change=lambda state: self.heartbeat.publish_soon(),
        )
        self.heartbeat = Heartbeat(store=self.store, settings=settings, name=self.name, state=self.state)

    def _count_batch(self, size: int, elapsed: float) -> None:
        self.batched_jobs += size
        log.info("batch of %d ran in %.3f s on %s", size, elapsed, self.device)

    def state(self) -> dict[str, Any]:
        """What ``GET /v1/workers`` shows of this worker."""
        batches = self.batcher.batches_run
        return {
            "engine": self.engine_name,
            "device": self.device,
            "breaker": self.breaker.snapshot(),
            "models": self.engine.loaded_models() if hasattr(self.engine, "loaded_models") else [],
            "batches_run": batches,
            "mean_batch_size": round(self.batched_jobs / batches, 3) if batches else None,
            # Seconds the device has been busy running jobs, the run going now included.
            "device_busy_s": round(self.batcher.busy.busy_s(), 3),
            # The share of the last minute the device spent running jobs, 0 to 1.
            "device_busy": round(self.batcher.busy.ratio(), 3),
            "max_batch": self.batcher.max_batch,
            "jobs_run": self.jobs_run,
        }

    def start(self) -> None:
        self.heartbeat.start()

    def close(self) -> None:
        self.heartbeat.stop()
        self.batcher.close()
        self.breaker.close()
        self.engine.close()


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    """The worker's ``--metrics-port`` and ``--metrics-host`` options."""
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (default: none, not recorded)"
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="the address --metrics-port listens on (default 127.0.0.1; 0.0.0.0 for a Prometheus on another host or container)",
    )


def serve_metrics(args: argparse.Namespace, *, prog: str) -> None:
    """Turn recording on and serve this process's metrics, if ``--metrics-port`` asks for it;
    exit saying so when that port is taken."""
    if args.metrics_port is None:
        return
    metrics.enable()
    try:
        prometheus_client.start_http_server(args.metrics_port, addr=args.metrics_host)
    except OSError as error:
        where = f"--metrics-port {args.metrics_port} ({args.metrics_host})"
        sys.exit(f"{prog}: cannot serve metrics on {where}: {error.strerror or error}")
    log.info("metrics at http://%s:%d/metrics", args.metrics_host, args.metrics_port)


# The process's contexts, by engine: a job of one engine never runs on another's engine.
_contexts: dict[str, WorkerContext] = {}
_contexts_lock = threading.Lock()


def install_context(context: WorkerContext) -> None:
    """Make ``context`` the one this process's tasks of its engine use (worker start-up calls this)."""
    with _contexts_lock:
        _contexts[context.engine_name] = context


def current_context(engine: str) -> WorkerContext:
    """The process's context for ``engine``; created on first use when no start-up installed one."""
    with _contexts_lock:
        context = _contexts.get(engine)
        if context is None:
            context = _contexts[engine] = WorkerContext(get_settings(), engine=engine)
            context.start()
        return context
