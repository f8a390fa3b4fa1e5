"""Running jobs' progress (``job.progress`` events), sent from a thread of each worker process.

An engine's step callback only notes the latest step; the reporter's thread appends the
events (``lua/append.lua``) at most once per ``BLAZE_PROGRESS_INTERVAL_S`` per job, all of
a round in one pipelined round trip.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

import redis

from blaze_jobs import scripts
from blaze_jobs.broker import webhook_task_template
from blaze_jobs.events import stream_maxlen
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings, get_settings

log = logging.getLogger("blaze_jobs.progress")


class ProgressReporter:
    """Sends running jobs' progress from a thread of its own, at most once per ``interval_s``
    per job (the latest step wins), so a denoising step pays a dict assignment, never a
    Redis round trip."""

    def __init__(
        self, client: redis.Redis, *, prefix: str, interval_s: float, maxlen: int | None = None, ttl_s: int | None = None
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.interval_s = interval_s
        self.maxlen = maxlen or stream_maxlen(get_settings())  # the stream's bound
        self.ttl_s = ttl_s or get_settings().job_ttl_s  # the jobs' retention, which their events share
        self.keys = Keys(prefix)
        self._append = scripts.script(client, "append")
        self._pending: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blaze-progress", daemon=True)
        self._thread.start()

    def report(self, job_id: str, step: int, total: int) -> None:
        with self._lock:
            self._pending[job_id] = (step, total)
        self._wake.set()

    def callback(self, job_id: str) -> Callable[[int, int], None]:
        """The ``on_progress`` of one job's engine request."""
        return lambda step, total: self.report(job_id, step, total)

    def flush(self) -> None:
        """Send what is pending now (tests and shutdown)."""
        with self._lock:
            batch, self._pending = self._pending, {}
            self._wake.clear()
        if not batch:
            return
        try:
            self._send(batch)
        except redis.exceptions.NoScriptError:  # first use, or Redis restarted and forgot it
            self.redis.script_load(scripts.source("append"))
            self._send(batch)

    def _send(self, batch: dict[str, tuple[int, int]]) -> None:
        # EVALSHA in a plain pipeline: one round trip (a pipeline given a Script object
        # would ask first whether the script is loaded, every time).
        template = webhook_task_template()
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, (step, total) in batch.items():
                progress = json.dumps({"step": step, "total": total}, separators=(",", ":"))
                fields = json.dumps({"progress": progress})
                keys = self.keys.event_keys(job_id)
                pipe.evalsha(
                    self._append.sha, len(keys), *keys, "job.progress", fields, fields, self.maxlen, template, self.ttl_s
                )
            pipe.execute()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            try:
                self.flush()
            except redis.RedisError as error:  # progress is best effort; the job goes on
                log.warning("could not report progress: %s", error)
            self._stop.wait(self.interval_s)


_reporter: ProgressReporter | None = None
_reporter_lock = threading.Lock()


def progress_callback(client: redis.Redis, settings: Settings, job_id: str) -> Callable[[int, int], None] | None:
    """The step callback that reports ``job_id``'s progress through this process's reporter,
    or None when ``BLAZE_PROGRESS_INTERVAL_S`` turns progress off."""
    global _reporter
    if settings.progress_interval_s <= 0:
        return None
    with _reporter_lock:
        if _reporter is None:
            _reporter = ProgressReporter(
                client,
                prefix=settings.redis_prefix,
                interval_s=settings.progress_interval_s,
                maxlen=stream_maxlen(settings),
                ttl_s=settings.job_ttl_s,
            )
    return _reporter.callback(job_id)
