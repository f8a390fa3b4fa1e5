"""Job records in Redis: create, read, list, and move between statuses atomically.

A job is a hash (``keys.Keys.job``) with the job's retention TTL, and belongs to a tenant
(its ``tenant`` field). Sorted sets of each tenant index its jobs by creation time (all, per
status, per engine) for listing, newest first; the deployment's own index only its live jobs
(queued, running) for the reaper. Every status change goes through one Lua script, so a
worker finishing a job and a client canceling it can never both win; each change is
appended to the job's event stream (``events.py``).

``JobStore`` serves workers and the CLI (blocking redis-py); the API uses
``AsyncJobStore`` (redis.asyncio). Both share the keys, the scripts and the record helpers of
``records.py``.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterable
from typing import Any

import orjson
import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from blaze_jobs import scripts
from blaze_jobs.errors import ClaimTakenOver, JobConflict, JobNotFound, QueueFull, QuotaExceeded
from blaze_jobs.jobs import JobStatus
from blaze_jobs.keys import Keys as Keys  # named here too: tests and callers import it from the store
from blaze_jobs.records import (
    EXPIRES,
    decode,
    expires_at_ms,
    parse_cursor,
    queue_create,
    score_of,
    text,
    transition_call,
    transition_result,
)
from blaze_jobs.settings import Settings


class JobStore:
    """Blocking access to job records, for workers and the CLI."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self._transition = scripts.script(client, "transition")
        self._release = scripts.script(client, "release")

    def create(self, record: dict[str, str]) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            queue_create(pipe, self.keys, record, ttl_s=self.settings.job_ttl_s)
            pipe.execute()

    def get(self, job_id: str) -> dict[str, str]:
        record = decode(self.redis.hgetall(self.keys.job(job_id)))
        if not record:
            raise JobNotFound(job_id)
        return record

    def status(self, job_id: str) -> JobStatus | None:
        value = self.redis.hget(self.keys.job(job_id), "status")
        return JobStatus(text(value)) if value else None

    def transition(
        self,
        job_id: str,
        *,
        tenant: str | None = None,
        allowed: Iterable[JobStatus],
        to: JobStatus,
        count_attempt: bool = False,
        attempts: int | None = None,
        lease: dict[str, Any] | None = None,
        release: dict[str, str] | None = None,
        unleased: str | None = None,
        push: dict[str, Any] | None = None,
        set_attempts: int | None = None,
        **fields: Any,
    ) -> str:
        """Move the job (of ``tenant``, the default tenant if None) to ``to`` if it is in one
        of ``allowed`` (and the conditions hold); returns the status it left. See
        ``lua/transition.lua`` for the options. ``attempts`` guards the move; ``set_attempts``
        writes the count (an attempt given back)."""
        if set_attempts is not None:
            fields["attempts"] = set_attempts
        # The lease the move takes, drops or requires gone is the job's; the key named wins.
        lease_key = (release or {}).get("key") or unleased or (lease or {}).get("key")
        script_keys, args = transition_call(
            self.keys,
            job_id,
            tenant=tenant or self.settings.default_tenant,
            ttl=self.settings.job_ttl_s,
            allowed=allowed,
            to=to,
            fields=fields,
            lease_key=lease_key,
            push=push,
            attempt=count_attempt,
            attempts=None if attempts is None else str(attempts),
            lease=lease and {k: v for k, v in lease.items() if k != "key"},
            release=release and {"owner": release["owner"], "ms": int(self.settings.lease_s * 1000)},
            unleased=bool(unleased),
        )
        return transition_result(job_id, self._transition(keys=script_keys, args=args), wanted=to.value)

    def take(self, job_id: str, *, tenant: str | None = None, worker: str, lease_ms: int, **fields: Any) -> dict[str, str]:
        """A worker's start of a queued job, in one round trip: the job becomes running, its
        attempt is counted, the worker holds its lease as ``<worker>:<attempt>``; returns the
        job's fields after the move. Raises JobNotFound, or JobConflict unless it was queued.
        ``tenant`` is the job's, as its message names it (None: the default tenant)."""
        lease = {"owner": worker, "ms": lease_ms, "numbered": True}
        script_keys, args = transition_call(
            self.keys,
            job_id,
            tenant=tenant or self.settings.default_tenant,
            ttl=self.settings.job_ttl_s,
            allowed=(JobStatus.queued,),
            to=JobStatus.running,
            fields={**fields, "worker": worker},
            attempt=True,
            lease=lease,
            read=True,
        )
        reply = self._transition(keys=script_keys, args=args)
        transition_result(job_id, reply, wanted=JobStatus.running.value)
        flat = reply[2]
        return decode(dict(zip(flat[::2], flat[1::2], strict=True)))

    def release_lease(self, job_id: str, *, owner: str) -> bool:
        """Drop the job's lease if ``owner`` still holds it; another attempt's stays."""
        return bool(self._release(keys=[self.keys.lease(job_id)], args=[owner]))


class AsyncJobStore:
    """Non-blocking access to job records, for the API."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self._transition = scripts.script(client, "transition")
        self._create = scripts.script(client, "create")
        # By tenant: the tenant's queued, running and all indexes and the deployment's queued
        # one, which lead every create's KEYS; by (tenant, engine): the engine's index.
        self._tenant_indexes: dict[str, list[str]] = {}
        self._engine_indexes: dict[tuple[str, str], str] = {}

    async def create_queued(
        self, record: dict[str, str], *, queue: str, message: str, max_jobs: int = 0, claim: tuple[str, str] | None = None
    ) -> None:
        """Admit a new queued job, store it, index it and push its Celery message, in one
        round trip. Raises QuotaExceeded when its tenant (``record["tenant"]``) already has
        ``max_jobs`` jobs queued or running (0: no quota), QueueFull when the engine's queue
        holds ``BLAZE_QUEUE_MAX`` messages, and ClaimTakenOver when ``claim`` (an
        Idempotency-Key's key and the value this create holds it with) is no longer held;
        then nothing is written."""
        await self.create_many(record["tenant"], [(record, queue, message)], max_jobs=max_jobs, claim=claim)

    async def create_many(
        self,
        tenant: str,
        jobs: builtins.list[tuple[dict[str, str], str, str]],
        *,
        max_jobs: int = 0,
        claim: tuple[str, str] | None = None,
        admit: dict[tuple[str, str], int] | None = None,
        admitted: bool = False,
    ) -> None:
        """``create_queued`` for several new jobs of ``tenant``, each ``(record, queue,
        message)``, in one call of the same script: all are stored, or (QuotaExceeded,
        QueueFull, ClaimTakenOver) none is. The quota and the queue bounds count the jobs of
        ``admit``, by (engine, queue), when given (a batch admitted whole with its first
        part), else this call's; ``admitted``: the jobs were admitted by an earlier call
        (a batch's later parts), and are not counted again."""
        ttl_s = self.settings.job_ttl_s
        shared = self._tenant_indexes.get(tenant)
        if shared is None:
            keys = self.keys
            shared = self._tenant_indexes[tenant] = [
                keys.tenant_status(tenant, JobStatus.queued.value),
                keys.tenant_status(tenant, JobStatus.running.value),
                keys.tenant_all(tenant),
                keys.status(JobStatus.queued.value),
            ]
        # Each engine's pair of keys (its index, its queue): those admitted, then the jobs'.
        engines: dict[tuple[str, str], int] = {}
        engine_keys: builtins.list[str] = []
        counted: builtins.list[int] = []
        engine_indexes = self._engine_indexes

        def number_of(engine: str, queue: str) -> int:
            number = engines.get((engine, queue))
            if number is None:
                index = engine_indexes.get((tenant, engine))
                if index is None:
                    index = engine_indexes[(tenant, engine)] = self.keys.tenant_engine(tenant, engine)
                number = engines[(engine, queue)] = len(engines) + 1
                engine_keys.extend((index, queue))
                counted.append(0)
            return number

        for (engine, queue), count in (admit or {}).items():
            counted[number_of(engine, queue) - 1] += count
        engine_of: builtins.list[int] = []
        records: builtins.list[dict[str, str]] = []
        job_keys: builtins.list[str] = []
        messages: builtins.list[str] = []
        for record, queue, message in jobs:
            number = number_of(record["engine"], queue)
            if admit is None:
                counted[number - 1] += 1
            engine_of.append(number)
            created_at = record["created_at"]
            records.append({**record, "score": str(score_of(float(created_at))), EXPIRES: str(expires_at_ms(created_at, ttl_s))})
            job_keys.append(self.keys.job(record["id"]))
            messages.append(message)
        script_keys = [*shared, *engine_keys, *job_keys]
        if claim is not None:
            script_keys.append(claim[0])
        oldest = score_of(time.time() - ttl_s)
        claimed = claim[1] if claim is not None else ""
        quota, bound = (0, 0) if admitted else (max_jobs, self.settings.queue_max)
        args = [
            quota,
            bound,
            oldest,
            claimed,
            len(engines),
            orjson.dumps(counted),
            orjson.dumps(engine_of),
            orjson.dumps(records),
        ]
        args += messages
        try:
            # EVALSHA straight away: the script object's own call costs ~10 µs more, per create.
            reply = await self.redis.execute_command("EVALSHA", self._create.sha, len(script_keys), *script_keys, *args)
        except NoScriptError:  # Redis restarted or was flushed: the script object loads it again
            reply = await self._create(keys=script_keys, args=args)
        if reply == 1:
            return
        refusal, count = reply[0], reply[1]
        if refusal == -1:
            raise QuotaExceeded(tenant, count=int(count), limit=max_jobs)
        if refusal == -3:
            raise ClaimTakenOver(jobs[0][0]["id"])
        full = text(reply[2])
        engine = next(engine for engine, queue in engines if queue == full)
        raise QueueFull(engine, length=int(count), limit=self.settings.queue_max)

    async def get(self, job_id: str) -> dict[str, str]:
        record = decode(await self.redis.hgetall(self.keys.job(job_id)))
        if not record:
            raise JobNotFound(job_id)
        return record

    async def transition(
        self,
        job_id: str,
        *,
        tenant: str,
        allowed: Iterable[JobStatus],
        to: JobStatus,
        streamed: bool = False,
        owned: bool = False,
        **fields: Any,
    ) -> str:
        """Move a job of ``tenant`` (see ``JobStore.transition``). ``owned``: only if the job is
        ``tenant``'s, else JobNotFound, as if it did not exist."""
        # A record from before tenants is the default tenant's.
        owner = [tenant, tenant == self.settings.default_tenant] if owned else None
        script_keys, args = transition_call(
            self.keys,
            job_id,
            tenant=tenant,
            ttl=self.settings.job_ttl_s,
            allowed=allowed,
            to=to,
            fields=fields,
            streamed=streamed,
            owner=owner,
        )
        reply = await self._transition(keys=script_keys, args=args)
        return transition_result(job_id, reply, wanted=to.value)

    async def cancel(self, job_id: str, *, tenant: str) -> None:
        """Cancel a queued or running job of ``tenant``; another tenant's is JobNotFound and
        stays as it is. A worker drops a canceled job when it takes it, and stops a running
        one at its next step."""
        now = repr(time.time())
        try:
            await self.transition(
                job_id,
                tenant=tenant,
                owned=True,
                allowed=(JobStatus.queued, JobStatus.running),
                to=JobStatus.canceled,
                # A streaming text job ends with the text it streamed, in the same step, so its
                # job.completed carries the output its record keeps.
                streamed=True,
                completed_at=now,
                error='{"type":"canceled","message":"canceled by request"}',
            )
        except JobConflict as conflict:
            raise JobConflict(f"job {job_id} already ended") from conflict

    async def cancel_many(self, job_ids: Iterable[str], *, tenant: str, reason: str, chunk: int = 500) -> int:
        """``cancel`` for many jobs of ``tenant`` (a batch's), pipelined ``chunk`` at a time;
        jobs that already ended (or are gone, or another tenant's) stay as they are. Returns
        how many it canceled. ``reason`` is the canceled jobs' error message."""
        fields = {"completed_at": repr(time.time()), "error": json.dumps({"type": "canceled", "message": reason})}
        owner = [tenant, tenant == self.settings.default_tenant]
        canceled = 0
        ids = builtins.list(job_ids)
        for start in range(0, len(ids), chunk):
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids[start : start + chunk]:
                    script_keys, args = transition_call(
                        self.keys,
                        job_id,
                        tenant=tenant,
                        ttl=self.settings.job_ttl_s,
                        allowed=(JobStatus.queued, JobStatus.running),
                        to=JobStatus.canceled,
                        fields=fields,
                        streamed=True,
                        owner=owner,
                    )
                    await self._transition(keys=script_keys, args=args, client=pipe)
                replies = await pipe.execute()
            canceled += sum(1 for reply in replies if reply[0] == 1)
        return canceled

    async def list(
        self, *, tenant: str, status: str | None, engine: str | None, limit: int, cursor: str | None
    ) -> tuple[builtins.list[dict[str, str]], str | None]:
        """A page of ``tenant``'s jobs, newest first, and the cursor of the next page (None on
        the last). It reads only the tenant's own indexes.

        A cursor is ``<score>:<job id>`` of the last job of the page: jobs created in the same
        microsecond share a score, and the id orders them (as Redis does), so none is skipped
        or repeated at a page's edge. A bare ``<score>`` (older cursors) starts below it."""
        index = self.keys.index_for(tenant=tenant, status=status, engine=engine)
        oldest = score_of(time.time() - self.settings.job_ttl_s)
        # Index entries outlive their jobs by at most one retention period; drop them here.
        await self.redis.zremrangebyscore(index, "-inf", f"({oldest}")
        position = parse_cursor(cursor) if cursor else None
        page: builtins.list[dict[str, str]] = []
        # Filters the index cannot answer (engine under a status index, expired records)
        # are applied here; fetch in rounds until the page is full or the index ends.
        while len(page) <= limit:
            ids = await self._entries_after(index, position, oldest=oldest, count=limit + 1)
            if not ids:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _ in ids:
                    pipe.hgetall(self.keys.job(job_id))
                raws = await pipe.execute()
            for _, raw in zip(ids, raws, strict=True):
                record = decode(raw)
                if record and (engine is None or record["engine"] == engine):
                    page.append(record)
                    if len(page) > limit:
                        break
            if len(ids) <= limit:
                break
            position = (ids[-1][1], ids[-1][0])
        next_cursor = f"{page[limit - 1]['score']}:{page[limit - 1]['id']}" if len(page) > limit else None
        return page[:limit], next_cursor

    async def _entries_after(
        self, index: str, position: tuple[int, str | None] | None, *, oldest: int, count: int
    ) -> builtins.list[tuple[str, int]]:
        """Up to ``count`` (job id, score) of ``index`` after ``position``, newest first."""
        if position is None:
            raw: Any = await self.redis.zrevrangebyscore(index, "+inf", oldest, start=0, num=count, withscores=True)
            return [(text(member), int(score)) for member, score in raw]
        score, after = position
        entries: builtins.list[tuple[str, int]] = []
        if after is not None:
            # The rest of the jobs of the same microsecond (a handful at most): Redis orders
            # equal scores by member, so newest first they come in descending id order.
            ties = await self.redis.zrangebyscore(index, score, score)
            entries = [(m, score) for m in sorted((text(t) for t in ties), reverse=True) if m < after][:count]
        if len(entries) < count:
            raw = await self.redis.zrevrangebyscore(
                index, f"({score}", oldest, start=0, num=count - len(entries), withscores=True
            )
            entries += [(text(member), int(member_score)) for member, member_score in raw]
        return entries
