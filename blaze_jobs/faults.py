"""Whose fault a worker fault is: the worker's (its breaker counts it) or the job's (a
poison job, which faults every worker it meets).

A faulty device faults every job, so its breaker opens on the first faults of a few jobs.
So a job records the workers it faulted on (its ``faulted_on`` field): it counts against a
worker's breaker at most once (a repeat on the same worker says nothing new), and a fault
on a second worker counts against none: the job fails as the request's own, naming the
workers. Meanwhile a requeued faulted job waits behind the queue (``broker.requeue_push``),
and a worker that draws a job it faulted hands it to a live peer (``live_peers``) through
the peer's inbox (``inboxes.py``).
"""

from __future__ import annotations

import json
import time

import redis

from blaze_jobs.breaker import BreakerState
from blaze_jobs.broker import faulted_workers
from blaze_jobs.errors import JobConflict, JobNotFound
from blaze_jobs.heartbeat import worker_key, workers_index
from blaze_jobs.jobs import JobStatus
from blaze_jobs.settings import Settings
from blaze_jobs.store import JobStore


def poison_error(record: dict[str, str], worker: str, reason: str) -> str | None:
    """The error of a job whose fault on ``worker`` is its second worker's, else None."""
    before = faulted_workers(record)
    if all(name == worker for name in before):
        return None
    workers = [*dict.fromkeys([*before, worker])]
    return (
        f"the job faulted on {len(workers)} workers ({', '.join(workers)}), so the job, not a worker, is at fault; last: {reason}"
    )


def counts_against(record: dict[str, str], worker: str) -> bool:
    """Does the job's fault count against ``worker``'s breaker (its first fault there)?"""
    return worker not in faulted_workers(record)


def note_fault(store: JobStore, job_id: str, *, tenant: str, attempt: int, worker: str) -> None:
    """Record on the job (of ``tenant``) that it faulted on ``worker`` (guarded by the
    attempt, like every write)."""
    try:
        store.transition(
            job_id,
            tenant=tenant,
            allowed=(JobStatus.running,),
            to=JobStatus.running,
            attempts=attempt,
            faulted_on=json.dumps([worker]),
        )
    except (JobConflict, JobNotFound):
        pass  # the attempt is no longer ours: its end will not be recorded either


def live_peers(client: redis.Redis, settings: Settings, *, name: str, engine: str) -> list[str]:
    """Live workers of ``engine`` besides ``name`` whose breaker lets them take jobs."""
    found = client.zrangebyscore(workers_index(settings), time.time() - settings.lease_s, "+inf")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in found]
    names = [n for n in names if n != name]
    states = [json.loads(s) for s in client.mget([worker_key(settings, n) for n in names]) if s] if names else []
    return [
        state["name"]
        for state in states
        if state.get("engine") == engine and state.get("breaker", {}).get("state") != BreakerState.open.value
    ]
