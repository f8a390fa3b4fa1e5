"""A worker's heartbeat: it renews the lease of every job the worker runs, publishes the
worker's state for ``GET /v1/workers``, and stands for election as the fleet's reaper
(``reaper.py``), which hands back the jobs whose worker died.

A lease is a Redis key ``<prefix>lease:<job>`` holding ``<worker>:<attempt>``, set in the
same Lua step that starts the job. Renewing it recreates it if it ran out while the job
still runs this attempt on this worker: a Redis outage longer than the lease must not take a
job from a worker that is still running it. Each beat renews first, then publishes; nothing
in a beat waits for the engine (a model loading holds the engine's lock for minutes).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

import redis

from blaze_jobs.jobs import JobStatus
from blaze_jobs.reaper import Reaper
from blaze_jobs.settings import Settings
from blaze_jobs.store import JobStore

log = logging.getLogger("blaze_jobs.heartbeat")

#: How often the worker reads the status of the jobs it runs, to see cancels: one pipelined
#: read for all of them, rather than one per job per denoising step on the device thread.
CANCEL_POLL_S = 0.1

# KEYS[1] is the lease, KEYS[2] the job; ARGV: the owner (``<worker>:<attempt>``), the
# lease's ms, the worker, the attempt. Extend the lease while it is ours; if it ran out (Redis
# was away longer than the lease), recreate it only while the job still runs this attempt on
# this worker: after a reap the job is queued or another attempt's, and its lease not ours.
RENEW_LUA = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if owner then return 0 end
local job = redis.call('HMGET', KEYS[2], 'status', 'worker', 'attempts')
if job[1] == 'running' and job[2] == ARGV[3] and job[3] == ARGV[4] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""


def worker_key(settings: Settings, name: str) -> str:
    return settings.key("worker", name)


def workers_index(settings: Settings) -> str:
    return settings.key("workers")


class Heartbeat:
    def __init__(self, *, store: JobStore, settings: Settings, name: str, state: Callable[[], dict[str, Any]]) -> None:
        self.store = store
        self.redis: redis.Redis = store.redis
        self.settings = settings
        self.name = name
        self.state = state
        self.held: dict[str, str] = {}  # job id -> lease owner token
        self.canceled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # publish now: the worker's state changed
        self._renew = self.redis.register_script(RENEW_LUA)
        self.reaper = Reaper(store=store, settings=settings, name=name)
        self._thread = threading.Thread(target=self._loop, name="blaze-heartbeat", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="blaze-cancel-watch", daemon=True)

    @property
    def interval_s(self) -> float:
        return self.settings.lease_s / 3

    def start(self) -> None:
        self._thread.start()
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self.reaper.resign()
        try:
            self.redis.delete(worker_key(self.settings, self.name))
            self.redis.zrem(workers_index(self.settings), self.name)
        except redis.RedisError:
            pass

    def hold(self, job_id: str, token: str) -> None:
        with self._lock:
            self.held[job_id] = token

    def publish_soon(self) -> None:
        """Beat now rather than at the next beat (the breaker changed state, say)."""
        self._wake.set()

    def release(self, job_id: str, token: str) -> None:
        """Stop renewing the lease ``token`` names: only that one (the same job may already
        be held again, by a later attempt on another task thread of this worker)."""
        with self._lock:
            if self.held.get(job_id) == token:
                del self.held[job_id]
                self.canceled.discard(job_id)

    def is_canceled(self, job_id: str) -> bool:
        """Was the job canceled (as of the last read, at most ``CANCEL_POLL_S`` ago)?"""
        return job_id in self.canceled

    def _watch(self) -> None:
        while not self._stop.wait(CANCEL_POLL_S):
            with self._lock:
                held = list(self.held)
            if not held:
                continue
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for job_id in held:
                        pipe.hget(self.store.keys.job(job_id), "status")
                    statuses = pipe.execute()
            except (redis.RedisError, OSError):
                continue
            with self._lock:
                for job_id, status in zip(held, statuses):
                    if status == JobStatus.canceled.value.encode() and job_id in self.held:
                        self.canceled.add(job_id)

    def _loop(self) -> None:
        # The first beat comes at once: the worker is listed as soon as it is ready.
        while True:
            try:
                self.beat()
                self.reaper.step()
            except (redis.RedisError, OSError) as error:
                # Redis away: leases cannot be renewed now; the next beat tries again.
                self.reaper.lost_redis()
                log.warning("heartbeat: %s", error)
            except Exception:  # a bug in a beat must not stop every later beat (and lose every lease)
                self.reaper.lost_redis()
                log.exception("heartbeat failed")
            self._wake.wait(self.interval_s)
            if self._stop.is_set():
                return
            self._wake.clear()

    def beat(self) -> None:
        """Renew (or recreate) held leases, then publish this worker's state."""
        lease_ms = int(self.settings.lease_s * 1000)
        with self._lock:
            held = dict(self.held)
        if held:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, owner in held.items():
                    worker, attempt = owner.rsplit(":", 1)
                    keys = [self.store.keys.lease(job_id), self.store.keys.job(job_id)]
                    self._renew(keys=keys, args=[owner, lease_ms, worker, attempt], client=pipe)
                pipe.execute()
        state = {**self.state(), "name": self.name, "heartbeat_at": time.time(), "jobs_held": len(held)}
        ttl = max(int(self.interval_s * 3), 1)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(worker_key(self.settings, self.name), json.dumps(state), ex=ttl)
            pipe.zadd(workers_index(self.settings), {self.name: time.time()})
            pipe.zremrangebyscore(workers_index(self.settings), "-inf", time.time() - 24 * 3600)
            pipe.execute()
