"""A worker's heartbeat: it renews the lease of every job the worker runs, publishes the
worker's state for ``GET /v1/workers``, and hands back to the queue any running job whose
lease has run out because its worker died.

A lease is a Redis key ``<prefix>lease:<job>`` holding ``<worker>:<attempt>``, set in the
same Lua step that starts the job. A worker killed with SIGKILL stops renewing; within
``lease_s`` (plus one reaping interval) a live worker moves the job back to ``queued`` and
pushes a fresh message in one atomic step, or fails it once it has used all its attempts.

It also gives a fresh message to a queued job whose message was lost: a worker's BRPOP takes
a message off its queue and records it as unacknowledged only in a second step, so Redis
stopping between the two drops it while the job record still says ``queued``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

import redis

from blaze_jobs.broker import queue_key, requeue_push
from blaze_jobs.errors import BlazeError
from blaze_jobs.jobs import JobStatus
from blaze_jobs.settings import ENGINES, Settings
from blaze_jobs.store import JobStore, decode, score_of

log = logging.getLogger("blaze_jobs.heartbeat")

#: How often the worker reads the status of the jobs it runs, to see cancels: one pipelined
#: read for all of them, rather than one per job per denoising step on the device thread.
CANCEL_POLL_S = 0.1

# Renew a lease only while it is still ours: after a reap another worker may hold the job.
RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
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
        self._renew = self.redis.register_script(RENEW_LUA)
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
        self._thread.join(timeout=5)
        try:
            self.redis.delete(worker_key(self.settings, self.name))
            self.redis.zrem(workers_index(self.settings), self.name)
        except redis.RedisError:
            pass

    def hold(self, job_id: str, token: str) -> None:
        with self._lock:
            self.held[job_id] = token

    def release(self, job_id: str) -> None:
        with self._lock:
            self.held.pop(job_id, None)
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
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
                self.reap()
                self.rescue()
            except (redis.RedisError, OSError) as error:
                # Redis away: leases cannot be renewed now; the next beat tries again.
                log.warning("heartbeat: %s", error)

    def beat(self) -> None:
        """Renew held leases and publish this worker's state."""
        lease_ms = int(self.settings.lease_s * 1000)
        with self._lock:
            held = dict(self.held)
        for job_id, token in held.items():
            self._renew(keys=[self.store.keys.lease(job_id)], args=[token, lease_ms])
        state = {**self.state(), "name": self.name, "heartbeat_at": time.time(), "jobs_held": len(held)}
        ttl = max(int(self.interval_s * 3), 1)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(worker_key(self.settings, self.name), json.dumps(state), ex=ttl)
            pipe.zadd(workers_index(self.settings), {self.name: time.time()})
            pipe.zremrangebyscore(workers_index(self.settings), "-inf", time.time() - 24 * 3600)
            pipe.execute()

    def reap(self) -> int:
        """Hand back (or fail) running jobs whose lease ran out; returns how many."""
        keys = self.store.keys
        running = [r.decode() for r in self.redis.zrange(keys.status(JobStatus.running.value), 0, -1)]
        if not running:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in running:
                pipe.exists(keys.lease(job_id))
            leased = pipe.execute()
        reaped = 0
        for job_id, has_lease in zip(running, leased):
            if not has_lease:
                reaped += self._reap_one(job_id)
        return reaped

    def rescue(self) -> int:
        """Queue again the jobs queued for longer than the broker's visibility timeout whose
        message is in no queue and not unacknowledged; returns how many. While there are at
        least as many messages as queued jobs, nothing can be lost: five counters, no scan."""
        keys, queued_index = self.store.keys, self.store.keys.status(JobStatus.queued.value)
        queues = [queue_key(self.settings, engine) for engine in ENGINES]
        unacked = self.settings.redis_prefix + "unacked"  # kombu's, under the same key prefix
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(queued_index)
            for queue in queues:
                pipe.llen(queue)
            pipe.hlen(unacked)
            queued, *messages = pipe.execute()
        if sum(messages) >= queued:
            return 0
        old = [r.decode() for r in self.redis.zrangebyscore(queued_index, "-inf", score_of(time.time() - self.settings.visibility_timeout_s))]
        if not old:
            return 0
        present = {_job_of(m) for queue in queues for m in self.redis.lrange(queue, 0, -1)}
        present |= {_job_of(v, unacked=True) for v in self.redis.hvals(unacked)}
        rescued = 0
        for job_id in old:
            if job_id in present:
                continue
            record = decode(self.redis.hgetall(keys.job(job_id)))
            if not record:  # the job expired: only its index entry was left
                self.redis.zrem(queued_index, job_id)
                continue
            try:
                self.store.transition(job_id, allowed=(JobStatus.queued,), to=JobStatus.queued, push=requeue_push(self.settings, record))
            except BlazeError:
                continue  # taken or canceled meanwhile
            log.warning("job %s was queued without a message (lost in flight); queued again", job_id)
            rescued += 1
        return rescued

    def _reap_one(self, job_id: str) -> int:
        record = decode(self.redis.hgetall(self.store.keys.job(job_id)))
        if record.get("status") != JobStatus.running.value:
            return 0
        attempts = int(record.get("attempts") or 0)
        lease = self.store.keys.lease(job_id)
        try:
            if attempts >= self.settings.max_attempts:
                reason = f"its worker was lost on each of {attempts} attempts"
                self.store.transition(
                    job_id,
                    allowed=(JobStatus.running,),
                    to=JobStatus.failed,
                    attempts=attempts,
                    unleased=lease,
                    error=json.dumps({"type": "worker_fault", "message": reason}),
                    completed_at=repr(time.time()),
                )
                log.warning("job %s failed: %s", job_id, reason)
            else:
                self.store.transition(
                    job_id,
                    allowed=(JobStatus.running,),
                    to=JobStatus.queued,
                    attempts=attempts,
                    unleased=lease,
                    push=requeue_push(self.settings, record),
                )
                log.warning("job %s lost its worker (lease ran out); queued again", job_id)
        except BlazeError:
            return 0  # another worker reaped it first, or it ended meanwhile
        return 1


def _job_of(raw: bytes, *, unacked: bool = False) -> str | None:
    """The job id of a Celery message in a queue (or, ``unacked``, in kombu's unacked hash)."""
    try:
        message = json.loads(raw)
        return (message[0] if unacked else message)["headers"]["id"]
    except (ValueError, LookupError, TypeError):
        return None
