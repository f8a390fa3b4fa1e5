"""The lease keeper: the jobs this worker runs, their leases renewed and their cancels seen.

A lease (``keys.Keys.lease``) holds ``<worker>:<attempt>`` and is set in the same Lua step
that starts the job (``store.JobStore.take``). Renewing it recreates it if it ran out while
the job still runs this attempt on this worker (``lua/renew.lua``): a Redis outage longer
than the lease must not take a job from a worker that is still running it. A worker renews
only the leases it holds; the elected reaper (``reaper.py``) hands back the jobs whose lease
is gone.
"""

from __future__ import annotations

import threading

import redis

from blaze_jobs import scripts
from blaze_jobs.jobs import JobStatus
from blaze_jobs.keys import Keys

CANCELED = JobStatus.canceled.value.encode()


class LeaseKeeper:
    """The leases of this worker's attempts, and which of their jobs were canceled."""

    def __init__(self, client: redis.Redis, keys: Keys, *, lease_s: float) -> None:
        self.redis = client
        self.keys = keys
        self.lease_s = lease_s
        self.held: dict[str, str] = {}  # job id -> lease owner token
        self.canceled: set[str] = set()
        self._lock = threading.Lock()
        self._renew = scripts.script(client, "renew")

    def hold(self, job_id: str, token: str) -> None:
        with self._lock:
            self.held[job_id] = token

    def release(self, job_id: str, token: str) -> None:
        """Stop renewing the lease ``token`` names: only that one (the same job may already
        be held again, by a later attempt on another task thread of this worker)."""
        with self._lock:
            if self.held.get(job_id) == token:
                del self.held[job_id]
                self.canceled.discard(job_id)

    def is_canceled(self, job_id: str) -> bool:
        return job_id in self.canceled

    def renew(self) -> int:
        """Renew (or recreate) every lease held, in one round trip; returns how many are held."""
        with self._lock:
            held = dict(self.held)
        if held:
            try:
                self._send_renewals(held)
            except redis.exceptions.NoScriptError:  # Redis restarted, or was flushed, and forgot it
                self.redis.script_load(self._renew.script)
                self._send_renewals(held)
        return len(held)

    def _send_renewals(self, held: dict[str, str]) -> None:
        # EVALSHA in a plain pipeline: a pipeline given a Script object would first ask Redis
        # whether the script is loaded (SCRIPT EXISTS), a second round trip at every beat.
        lease_ms = int(self.lease_s * 1000)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, owner in held.items():
                worker, attempt = owner.rsplit(":", 1)
                pipe.evalsha(self._renew.sha, 2, self.keys.lease(job_id), self.keys.job(job_id), owner, lease_ms, worker, attempt)
            pipe.execute()

    def look_for_cancels(self) -> None:
        """Read the status of every job held, in one round trip, and note the canceled ones."""
        with self._lock:
            held = list(self.held)
        if not held:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in held:
                pipe.hget(self.keys.job(job_id), "status")
            statuses = pipe.execute()
        with self._lock:
            for job_id, status in zip(held, statuses, strict=True):
                if status == CANCELED and job_id in self.held:
                    self.canceled.add(job_id)
