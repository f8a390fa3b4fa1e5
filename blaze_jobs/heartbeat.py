"""A worker's heartbeat: at every beat it renews the leases of the jobs the worker runs
(``leases.py``), then publishes the worker's state for ``GET /v1/workers``. It also starts
the worker's reaper (``reaper.py``), which stands for election on a thread of its own, so
that the elected worker's scans never delay a beat.

Nothing in a beat waits for the engine (a model loading holds the engine's lock for minutes).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from blaze_jobs.keys import Keys
from blaze_jobs.leases import LeaseKeeper
from blaze_jobs.reaper import Reaper
from blaze_jobs.settings import Settings
from blaze_jobs.store import JobStore

log = logging.getLogger("blaze_jobs.heartbeat")


def worker_key(settings: Settings, name: str) -> str:
    return Keys(settings.redis_prefix).worker(name)


def workers_index(settings: Settings) -> str:
    return Keys(settings.redis_prefix).workers


class Heartbeat:
    def __init__(self, *, store: JobStore, settings: Settings, name: str, state: Callable[[], dict[str, Any]]) -> None:
        self.store = store
        self.redis: redis.Redis = store.redis
        self.settings = settings
        self.name = name
        self.state = state
        self.leases = LeaseKeeper(self.redis, store.keys, lease_s=settings.lease_s)
        self._stop = threading.Event()
        self._wake = threading.Event()  # publish now: the worker's state changed
        self.reaper = Reaper(store=store, settings=settings, name=name)
        self._thread = threading.Thread(target=self._loop, name="blaze-heartbeat", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="blaze-cancel-watch", daemon=True)

    @property
    def interval_s(self) -> float:
        return self.settings.lease_s / 3

    def start(self) -> None:
        self._thread.start()
        self._watcher.start()
        self.reaper.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():  # a worker stopped before it started has no beat to wait for
            self._thread.join(timeout=5)
        self.reaper.stop()
        try:
            self.redis.delete(worker_key(self.settings, self.name))
            self.redis.zrem(workers_index(self.settings), self.name)
        except redis.RedisError:
            pass

    def hold(self, job_id: str, token: str) -> None:
        self.leases.hold(job_id, token)

    def release(self, job_id: str, token: str) -> None:
        """Stop renewing the lease ``token`` names (``LeaseKeeper.release``)."""
        self.leases.release(job_id, token)

    def publish_soon(self) -> None:
        """Beat now rather than at the next beat (the breaker changed state, say)."""
        self._wake.set()

    def is_canceled(self, job_id: str) -> bool:
        """Was the job canceled (as of the last read, at most ``BLAZE_CANCEL_POLL_S`` ago)?"""
        return self.leases.is_canceled(job_id)

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.cancel_poll_s):
            try:
                self.leases.look_for_cancels()
            except (redis.RedisError, OSError):
                continue

    def _loop(self) -> None:
        # The first beat comes at once: the worker is listed as soon as it is ready.
        while True:
            try:
                self.beat()
            except (redis.RedisError, OSError) as error:
                # Redis away: leases cannot be renewed now; the next beat tries again.
                log.warning("heartbeat: %s", error)
            except Exception:  # a bug in a beat must not stop every later beat (and lose every lease)
                log.exception("heartbeat failed")
            self._wake.wait(self.interval_s)
            if self._stop.is_set():
                return
            self._wake.clear()

    def beat(self) -> None:
        """Renew (or recreate) held leases, then publish this worker's state."""
        held = self.leases.renew()
        state = {**self.state(), "name": self.name, "heartbeat_at": time.time(), "jobs_held": held}
        ttl = max(int(self.interval_s * 3), 1)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(worker_key(self.settings, self.name), json.dumps(state), ex=ttl)
            pipe.zadd(workers_index(self.settings), {self.name: time.time()})
            pipe.zremrangebyscore(workers_index(self.settings), "-inf", time.time() - 24 * 3600)
            pipe.execute()
