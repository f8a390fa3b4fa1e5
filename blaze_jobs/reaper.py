"""The reaper: one elected worker at a time hands back to the queue the running jobs whose
worker died, and gives a fresh message to queued jobs whose message was lost.

Election is a lock key (``keys.Keys.reaper``) naming its holder, taken with ``SET NX`` and
renewed at every look, a third of a lease apart, with the lease's time to live
(``lua/elect.lua``): when the holder dies, another worker takes over within a lease and a
look. Only the holder scans the running jobs and the queues, so the fleet costs Redis one
scan per look, however many workers there are; every other worker's look is one EVALSHA.
Each worker's reaper runs on a thread of its own, so a long scan never delays its beats.

A job's worker is dead when the job's lease (``keys.Keys.lease``) is gone. But a lease
also runs out inside Redis while Redis is away, where no worker can renew it, and its live
worker recreates it on its first beat once Redis is back (``lua/renew.lua``). So the
reaper believes a missing lease only once it has itself reached Redis without a break for a
whole lease: by then every live worker has had a lease's time to renew. A break is an error,
or a gap between two of its looks longer than two beats (its commands retry with back-off
while Redis is away, so an outage can look like one slow command). And it reaps a job only
after seeing its lease missing for a beat, so a beat that comes late is not a death.

A worker killed with SIGKILL: its leases run out within a lease, the reaper sees them gone
at its next look and reaps them a beat later, within a lease and two beats. If the killed
worker was the reaper, its lock runs out in the same time and the next one takes over.

With metrics on, the elected worker counts what it reaps (``blaze_leases_reaped_total``, by
the job's engine and the status it moved to; a job failed after its last attempt in
``blaze_jobs_ended_total`` too) and rescues (``blaze_messages_rescued_total``). Only a worker
serving ``--metrics-port`` records: the sum over the workers that do is the fleet's only
while the elected one is among them (any worker may be elected, whatever its engine).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from blaze_jobs import inboxes, metrics, scripts
from blaze_jobs.broker import requeue_push, task_name
from blaze_jobs.errors import BlazeError
from blaze_jobs.jobs import JobStatus
from blaze_jobs.records import decode, score_of, tenant_of, text
from blaze_jobs.settings import ENGINES, Settings
from blaze_jobs.store import JobStore

log = logging.getLogger("blaze_jobs.reaper")

#: Engine task names: an unacknowledged message of any other task (a webhook delivery) is
#: no job's message.
JOB_TASKS = frozenset(task_name(engine) for engine in ENGINES)

#: How often the reaper trims the deployment's live indexes of the entries left by jobs that
#: expired unrun (their hash gone): rare enough to cost nothing, often enough that a scan of
#: the running jobs never reads many of them.
TRIM_EVERY_S = 60.0

#: How many tenants one trim goes through (one round trip each), so a pass stays well inside
#: a look's interval however many tenants there are; a deployment with more goes round them
#: over several passes, a minute per this many.
TRIM_TENANTS_PER_PASS = 500


class Reaper:
    def __init__(self, *, store: JobStore, settings: Settings, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.redis: redis.Redis = store.redis
        self.settings = settings
        self.name = name
        self.clock = clock
        self.lock_key = store.keys.reaper
        self.elected = False
        self._elect = scripts.script(self.redis, "elect")
        self._unlock = scripts.script(self.redis, "release")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blaze-reaper", daemon=True)
        self._last_look: float | None = None  # when it last reached Redis
        self._watching_since = 0.0  # since when it has reached Redis without a break
        self._missing: dict[tuple[str, str], float] = {}  # (job, attempt) -> first seen without lease
        self._trimmed: float | None = None  # when it last trimmed the indexes
        self._tenant_cursor = 0  # where the next trim goes on through the tenants (SSCAN)

    @property
    def interval_s(self) -> float:
        return self.settings.lease_s / 3

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop looking and give up the lock."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.resign()

    def _run(self) -> None:
        # The first look comes at once, as the worker's first beat does.
        while True:
            try:
                self.step()
            except (redis.RedisError, OSError) as error:
                self.lost_redis()
                log.warning("reaper: %s", error)
            except Exception:  # a bug in one look must not stop every later one
                self.lost_redis()
                log.exception("reaper failed")
            if self._stop.wait(self.interval_s):
                return

    def lost_redis(self) -> None:
        """Redis failed this worker: what it saw before says nothing about who is alive now."""
        self._last_look = None
        self._missing.clear()

    def resign(self) -> None:
        """Give up the lock (a worker stopping), so a peer takes over at its next beat."""
        try:
            self._unlock(keys=[self.lock_key], args=[self.name])
        except redis.RedisError:
            pass
        self.elected = False

    def step(self) -> int:
        """One look, every third of a lease: stand for election and, only if elected, reap the
        jobs whose worker died and rescue the lost messages. Returns how many jobs it reaped."""
        lease_ms = int(self.settings.lease_s * 1000)
        self.elected = bool(self._elect(keys=[self.lock_key], args=[self.name, lease_ms]))
        if not self.elected:
            self._looked(self.clock())
            self._missing.clear()
            return 0
        unleased = self._unleased()
        now = self.clock()
        self._looked(now)
        trusted = now - self._watching_since >= self.settings.lease_s
        missing: dict[tuple[str, str], float] = {}
        reaped = 0
        for seen in unleased:
            first = missing[seen] = self._missing.get(seen, now)
            if trusted and now - first >= self.interval_s:
                reaped += self._reap_one(*seen)
        self._missing = missing
        if trusted:  # a worker's beat, like a lease, is believed missing only once trusted
            inboxes.drain_dead(self.redis, self.settings)
        self.rescue()
        if self._trimmed is None or now - self._trimmed >= TRIM_EVERY_S:
            self.trim()
            self._trimmed = now
        return reaped

    def trim(self) -> int:
        """Drop the index entries older than a retention, whose jobs have expired: from the
        deployment's queued and running indexes (``Keys.live_statuses``: jobs that expired
        before they ended) and from the tenants' indexes (all, each engine's, each status's),
        which a list trims only when it reads that very index, so a tenant that never lists
        would keep them for ever. Returns how many.

        The tenants are those that ever had a key (``Keys.tenants``) and the default one (the
        admin token's, and everyone's with auth off). One round trip per tenant, at most
        ``TRIM_TENANTS_PER_PASS`` tenants a pass; the next pass goes on where this one ended."""
        keys = self.store.keys
        oldest = f"({score_of(time.time() - self.settings.job_ttl_s)}"
        with self.redis.pipeline(transaction=False) as pipe:
            for index in keys.live_statuses:
                pipe.zremrangebyscore(index, "-inf", oldest)
            removed = sum(pipe.execute())
        for tenant in self._tenants_to_trim():
            with self.redis.pipeline(transaction=False) as pipe:
                for index in self._tenant_indexes(tenant):
                    pipe.zremrangebyscore(index, "-inf", oldest)
                removed += sum(pipe.execute())
        return removed

    def _tenants_to_trim(self) -> list[str]:
        """The next tenants to trim: the default one at the start of each round, then the
        next stretch of ``Keys.tenants``, without repeats."""
        starting = self._tenant_cursor == 0
        cursor, found = self.redis.sscan(self.store.keys.tenants, self._tenant_cursor, count=TRIM_TENANTS_PER_PASS)
        self._tenant_cursor = int(cursor)
        tenants = [self.settings.default_tenant] if starting else []
        tenants += [text(t) for t in found]
        return list(dict.fromkeys(tenants))

    def _tenant_indexes(self, tenant: str) -> list[str]:
        """Every index ``tenant`` has: all its jobs, each engine's, each status's."""
        keys = self.store.keys
        engines = [keys.tenant_engine(tenant, engine) for engine in ENGINES]
        return [keys.tenant_all(tenant), *engines, *keys.tenant_statuses(tenant)]

    def _looked(self, now: float) -> None:
        if self._last_look is None or now - self._last_look > 2 * self.interval_s:
            self._watching_since = now
            self._missing.clear()
        self._last_look = now

    def _unleased(self) -> list[tuple[str, str]]:
        """(job, attempt) of every running job without a lease: one pipelined read."""
        keys = self.store.keys
        running = [text(r) for r in self.redis.zrange(keys.status(JobStatus.running.value), 0, -1)]
        if not running:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in running:
                pipe.exists(keys.lease(job_id))
                pipe.hget(keys.job(job_id), "attempts")
            replies = pipe.execute()
        found = zip(running, replies[::2], replies[1::2], strict=True)
        return [(job_id, text(attempts)) for job_id, leased, attempts in found if not leased and attempts is not None]

    def _reap_one(self, job_id: str, attempt: str) -> int:
        record = decode(self.redis.hgetall(self.store.keys.job(job_id)))
        if record.get("status") != JobStatus.running.value or record.get("attempts") != attempt:
            return 0
        attempts = int(attempt)
        change: dict[str, Any]
        if attempts >= self.settings.max_attempts:
            to, reason = JobStatus.failed, f"its worker was lost on each of {attempts} attempts"
            change = {"error": json.dumps({"type": "worker_fault", "message": reason}), "completed_at": repr(time.time())}
        else:
            to, reason = JobStatus.queued, "its worker was lost (its lease ran out)"
            change = {"push": requeue_push(self.settings, record), "requeued_at": repr(time.time())}
        try:
            lease = self.store.keys.lease(job_id)
            tenant = tenant_of(record.get("tenant"), self.settings)
            self.store.transition(
                job_id, tenant=tenant, allowed=(JobStatus.running,), to=to, attempts=attempts, unleased=lease, **change
            )
        except BlazeError:
            return 0  # its worker came back, another reaper was first, or it ended meanwhile
        log.warning("job %s %s: %s", job_id, to.value, reason)
        if metrics.enabled():
            engine = record.get("engine", "")
            metrics.LEASES_REAPED.labels(engine, to.value).inc()
            if to is JobStatus.failed:  # its end: no worker will count it
                metrics.JOBS_ENDED.labels(engine, to.value).inc()
        return 1

    def rescue(self) -> int:
        """Queue again the jobs queued for longer than the broker's visibility timeout whose
        message is in no queue and not unacknowledged; returns how many. While the queues
        hold at least as many messages as there are queued jobs, nothing can be lost: a few
        counters. The unacknowledged messages are no count to trust (running jobs hold theirs
        until they end, webhook deliveries are there too); they are read only for old jobs,
        and one counts only when kombu's index names it too (else kombu never restores it)."""
        keys, queued_index = self.store.keys, self.store.keys.status(JobStatus.queued.value)
        queues = [keys.queue(engine) for engine in ENGINES] + inboxes.inbox_queues(self.redis, self.settings)
        unacked = keys.unacked
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(queued_index)
            for queue in queues:
                pipe.llen(queue)
            queued, *messages = pipe.execute()
        if sum(messages) >= queued:
            return 0
        old = [
            text(r)
            for r in self.redis.zrangebyscore(queued_index, "-inf", score_of(time.time() - self.settings.visibility_timeout_s))
        ]
        if not old:
            return 0
        # A record counts only with its index entry: kombu restores (after the visibility
        # timeout) only what its index names, so a record written without one (a worker that
        # stopped between the two writes) holds a message nobody will ever hand back.
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(unacked)
            pipe.zrange(f"{unacked}_index", 0, -1)
            held, indexed = pipe.execute()
        tags = set(indexed)
        present = {_held_job(v) for tag, v in held.items() if tag in tags}
        present |= {_queued_job(m) for queue in queues for m in self.redis.lrange(queue, 0, -1)}
        rescued = 0
        for job_id in old:
            if job_id in present:
                continue
            record = decode(self.redis.hgetall(keys.job(job_id)))
            if not record:  # the job expired: only its index entry was left
                self.redis.zrem(queued_index, job_id)
                continue
            try:
                self.store.transition(
                    job_id,
                    tenant=tenant_of(record.get("tenant"), self.settings),
                    allowed=(JobStatus.queued,),
                    to=JobStatus.queued,
                    push=requeue_push(self.settings, record),
                )
            except BlazeError:
                continue  # taken or canceled meanwhile
            log.warning("job %s was queued without a message (lost in flight); queued again", job_id)
            if metrics.enabled():
                metrics.MESSAGES_RESCUED.labels(record.get("engine", "")).inc()
            rescued += 1
        return rescued


def _queued_job(raw: bytes | str) -> str | None:
    """The job id of a Celery message in a queue."""
    try:
        return json.loads(raw)["headers"]["id"]
    except (ValueError, LookupError, TypeError):
        return None


def _held_job(raw: bytes | str) -> str | None:
    """The job id of an unacknowledged message (kombu keeps ``[message, exchange, routing
    key]``), or None if it is no job's (a webhook delivery: its id is not a job's)."""
    try:
        headers = json.loads(raw)[0]["headers"]
        return headers["id"] if headers["task"] in JOB_TASKS else None
    except (ValueError, LookupError, TypeError):
        return None
