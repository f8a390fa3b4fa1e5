"""Job records in Redis: create, read, list, and move between statuses atomically.

A job is a hash ``<prefix>job:<id>`` with the job's retention TTL. Sorted sets index jobs by
creation time (all jobs, per status, per engine) for listing, newest first. Every status
change goes through one Lua script, so a worker finishing a job and a client canceling it
can never both win; each change is appended to the job's event stream (``events.py``).

``JobStore`` serves workers and the CLI (blocking redis-py); the API uses
``AsyncJobStore`` (redis.asyncio). Both share the keys, the script and the encoding here.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Iterable

import orjson
import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from blaze_jobs.errors import JobConflict, JobNotFound
from blaze_jobs.events import EVENT_FUNCTIONS_LUA, queue_born_ended
from blaze_jobs.jobs import JobStatus
from blaze_jobs.settings import Settings

# KEYS[1] is the job hash; ARGV[1] the key prefix; ARGV[2] a JSON spec:
#   from: statuses the job may be in; to: the new status; attempt: count a start;
#   fields: hash fields to set; attempts: only if the attempt count is this (a stale worker
#   cannot finish a job that was handed to another); lease: {key, owner, ms, numbered} to
#   take (numbered: the owner is suffixed with ':<attempts>' after the count), or
#   release: {key, owner} to drop the lease only if it is still this owner's (a stale attempt
#   must not drop the lease of the attempt that replaced it); unleased: move only if this
#   lease key is gone (its worker died); push: {key, message, back} to RPUSH (with back:
#   LPUSH) onto a queue in the same step, so a requeued job can never be left without a
#   message; streamed: a running text job's output becomes the text it streamed (a cancel;
#   see blaze_streamed_output in events.py); read: also return the job's fields after the move.
# A change of status is also appended to the job's event stream, with the webhook delivery
# it calls for (see events.py).
# Returns {1, old status} (with read: {1, old status, HGETALL}) when moved, {0, current status}
# when not, {-1} when no such job.
TRANSITION_LUA = EVENT_FUNCTIONS_LUA + """
local spec = cjson.decode(ARGV[2])
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {-1} end
local allowed = false
for _, status in ipairs(spec['from']) do if status == current then allowed = true end end
if not allowed then return {0, current} end
if spec['attempts'] and redis.call('HGET', KEYS[1], 'attempts') ~= spec['attempts'] then return {0, current} end
if spec['unleased'] and redis.call('EXISTS', spec['unleased']) == 1 then return {0, current} end
local args = {'status', spec['to']}
for name, value in pairs(spec['fields'] or {}) do args[#args + 1] = name; args[#args + 1] = value end
redis.call('HSET', KEYS[1], unpack(args))
if spec['attempt'] then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if spec['lease'] then
  local owner = spec['lease']['owner']
  if spec['lease']['numbered'] then owner = owner .. ':' .. redis.call('HGET', KEYS[1], 'attempts') end
  redis.call('SET', spec['lease']['key'], owner, 'PX', spec['lease']['ms'])
end
if spec['release'] and redis.call('GET', spec['release']['key']) == spec['release']['owner'] then
  redis.call('DEL', spec['release']['key'])
end
if spec['push'] then
  -- kombu pops from the right: back=true queues the job behind every job waiting (LPUSH)
  redis.call(spec['push']['back'] and 'LPUSH' or 'RPUSH', spec['push']['key'], spec['push']['message'])
end
local id = redis.call('HGET', KEYS[1], 'id')
local score = redis.call('HGET', KEYS[1], 'score')
if current ~= spec['to'] then
  redis.call('ZREM', ARGV[1] .. 'idx:status:' .. current, id)
  redis.call('ZADD', ARGV[1] .. 'idx:status:' .. spec['to'], score, id)
end
if spec['streamed'] and current == 'running' then blaze_streamed_output(KEYS[1], ARGV[1], id) end
if current ~= spec['to'] then blaze_status_event(KEYS[1], ARGV[1], id, spec['to']) end
if spec['read'] then return {1, current, redis.call('HGETALL', KEYS[1])} end
return {1, current}
"""

# Compare-and-delete: an attempt drops its job's lease only while the lease is still its own.
# KEYS[1] is the lease; ARGV[1] the owner (``<worker>:<attempt>``). Returns 1 if dropped.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# Creating a queued job is the API's hot path: one script (HSET, EXPIRE, three index ZADDs
# and the Celery message's LPUSH, atomic like MULTI) costs the API about half the client CPU
# of the same commands in a MULTI/EXEC pipeline, whose every reply redis-py parses. The hash
# travels as one JSON object: redis-py packs each argument of a command at ~1 µs apiece.
# KEYS: the job hash, idx:all, idx:status:queued, idx:engine:<engine>, the engine's queue.
# ARGV: ttl, Celery message, the hash's fields as a JSON object of strings (id and score in it).
CREATE_LUA = """
local job = cjson.decode(ARGV[3])
local fields = {}
for name, value in pairs(job) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[1])
for i = 2, 4 do redis.call('ZADD', KEYS[i], job['score'], job['id']) end
redis.call('LPUSH', KEYS[5], ARGV[2])
return 1
"""


class Keys:
    """Every Redis key the job store uses, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.all = f"{prefix}idx:all"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def status(self, status: str) -> str:
        return f"{self.prefix}idx:status:{status}"

    def engine(self, engine: str) -> str:
        return f"{self.prefix}idx:engine:{engine}"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}lease:{job_id}"

    def index_for(self, *, status: str | None, engine: str | None) -> str:
        if status:
            return self.status(status)
        if engine:
            return self.engine(engine)
        return self.all


CURSOR = re.compile(r"^(\d{1,20})(?::([0-9A-Za-z-]{1,64}))?$")


def parse_cursor(cursor: str) -> tuple[int, str | None]:
    """The (score, job id) a ``next_cursor`` names; ValueError if it is not one."""
    match = CURSOR.match(cursor)
    if match is None:
        raise ValueError(f"not a cursor: {cursor!r}")
    return int(match[1]), match[2]


def lease_owner(worker: str, attempt: int) -> str:
    """What a lease holds: the worker and the attempt it runs (``take`` writes the same)."""
    return f"{worker}:{attempt}"


def score_of(created_at: float) -> int:
    """Index score: creation time in microseconds, the order ``GET /v1/jobs`` pages by."""
    return int(created_at * 1_000_000)


def queue_create(pipe: Any, keys: Keys, record: dict[str, str], *, ttl_s: int) -> None:
    """Queue on a pipeline the commands that store a new job and index it."""
    score = score_of(float(record["created_at"]))
    record = {**record, "score": str(score)}
    key = keys.job(record["id"])
    pipe.hset(key, mapping=record)
    pipe.expire(key, ttl_s)
    for index in (keys.all, keys.status(record["status"]), keys.engine(record["engine"])):
        pipe.zadd(index, {record["id"]: score})
    if JobStatus(record["status"]).ended:
        queue_born_ended(pipe, prefix=keys.prefix, job_key=key)


def transition_args(keys: Keys, *, allowed: Iterable[JobStatus], to: JobStatus, fields: dict[str, Any], **options: Any) -> list[str]:
    spec = {"from": [s.value for s in allowed], "to": to.value, "fields": {k: str(v) for k, v in fields.items()}}
    spec.update({name: value for name, value in options.items() if value})
    return [keys.prefix, json.dumps(spec, separators=(",", ":"))]


def transition_result(job_id: str, reply: list[Any], *, wanted: str) -> str:
    """The status the job left; raises if the job is gone or was in another status."""
    if reply[0] == -1:
        raise JobNotFound(job_id)
    current = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
    if reply[0] == 0:
        raise JobConflict(f"job {job_id} is {current}, cannot become {wanted}")
    return current


def decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}


class JobStore:
    """Blocking access to job records, for workers and the CLI."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self._transition = client.register_script(TRANSITION_LUA)
        self._release = client.register_script(RELEASE_LUA)

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
        return JobStatus(value.decode()) if value else None

    def transition(
        self,
        job_id: str,
        *,
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
        """Move the job to ``to`` if it is in one of ``allowed`` (and the conditions hold);
        returns the status it left. See ``TRANSITION_LUA`` for the options. ``attempts``
        guards the move; ``set_attempts`` writes the count (an attempt given back)."""
        if set_attempts is not None:
            fields["attempts"] = set_attempts
        args = transition_args(
            self.keys,
            allowed=allowed,
            to=to,
            fields=fields,
            attempt=count_attempt,
            attempts=None if attempts is None else str(attempts),
            lease=lease,
            release=release,
            unleased=unleased,
            push=push,
        )
        return transition_result(job_id, self._transition(keys=[self.keys.job(job_id)], args=args), wanted=to.value)

    def take(self, job_id: str, *, worker: str, lease_ms: int, **fields: Any) -> dict[str, str]:
        """A worker's start of a queued job, in one round trip: the job becomes running, its
        attempt is counted, the worker holds its lease as ``<worker>:<attempt>``; returns the
        job's fields after the move. Raises JobNotFound, or JobConflict unless it was queued."""
        lease = {"key": self.keys.lease(job_id), "owner": worker, "ms": lease_ms, "numbered": True}
        args = transition_args(
            self.keys, allowed=(JobStatus.queued,), to=JobStatus.running, fields={**fields, "worker": worker}, attempt=True, lease=lease, read=True
        )
        reply = self._transition(keys=[self.keys.job(job_id)], args=args)
        transition_result(job_id, reply, wanted=JobStatus.running.value)
        flat = reply[2]
        return decode(dict(zip(flat[::2], flat[1::2])))

    def release_lease(self, job_id: str, *, owner: str) -> bool:
        """Drop the job's lease if ``owner`` still holds it; another attempt's stays."""
        return bool(self._release(keys=[self.keys.lease(job_id)], args=[owner]))


class AsyncJobStore:
    """Non-blocking access to job records, for the API."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self._transition = client.register_script(TRANSITION_LUA)
        self._create = client.register_script(CREATE_LUA)
        self._queued_indexes: dict[str, list[str]] = {}  # by engine: where a new job is indexed

    async def create_queued(self, record: dict[str, str], *, queue: str, message: str) -> None:
        """Store a new queued job, index it and push its Celery message, in one round trip."""
        fields = orjson.dumps({**record, "score": str(score_of(float(record["created_at"])))})
        indexes = self._queued_indexes.get(record["engine"])
        if indexes is None:
            keys = self.keys
            indexes = self._queued_indexes[record["engine"]] = [keys.all, keys.status(JobStatus.queued.value), keys.engine(record["engine"])]
        script_keys = [self.keys.job(record["id"]), *indexes, queue]
        args = [self.settings.job_ttl_s, message, fields]
        try:
            # EVALSHA straight away: the script object's own call costs ~10 µs more, per create.
            await self.redis.execute_command("EVALSHA", self._create.sha, len(script_keys), *script_keys, *args)
        except NoScriptError:  # Redis restarted or was flushed: the script object loads it again
            await self._create(keys=script_keys, args=args)

    async def get(self, job_id: str) -> dict[str, str]:
        record = decode(await self.redis.hgetall(self.keys.job(job_id)))
        if not record:
            raise JobNotFound(job_id)
        return record

    async def transition(
        self, job_id: str, *, allowed: Iterable[JobStatus], to: JobStatus, streamed: bool = False, **fields: Any
    ) -> str:
        args = transition_args(self.keys, allowed=allowed, to=to, fields=fields, streamed=streamed)
        reply = await self._transition(keys=[self.keys.job(job_id)], args=args)
        return transition_result(job_id, reply, wanted=to.value)

    async def cancel(self, job_id: str) -> None:
        """Cancel a queued or running job. A worker drops a canceled job when it takes it,
        and stops a running one at its next step."""
        now = repr(time.time())
        try:
            await self.transition(
                job_id,
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

    async def list(
        self, *, status: str | None, engine: str | None, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, str]], str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None on the last).

        A cursor is ``<score>:<job id>`` of the last job of the page: jobs created in the same
        microsecond share a score, and the id orders them (as Redis does), so none is skipped
        or repeated at a page's edge. A bare ``<score>`` (older cursors) starts below it."""
        index = self.keys.index_for(status=status, engine=engine)
        oldest = score_of(time.time() - self.settings.job_ttl_s)
        # Index entries outlive their jobs by at most one retention period; drop them here.
        await self.redis.zremrangebyscore(index, "-inf", f"({oldest}")
        position = parse_cursor(cursor) if cursor else None
        page: list[dict[str, str]] = []
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
            for (job_id, score), raw in zip(ids, raws):
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
    ) -> list[tuple[str, int]]:
        """Up to ``count`` (job id, score) of ``index`` after ``position``, newest first."""
        if position is None:
            raw = await self.redis.zrevrangebyscore(index, "+inf", oldest, start=0, num=count, withscores=True)
            return [(member.decode(), int(score)) for member, score in raw]
        score, after = position
        entries: list[tuple[str, int]] = []
        if after is not None:
            # The rest of the jobs of the same microsecond (a handful at most): Redis orders
            # equal scores by member, so newest first they come in descending id order.
            ties = await self.redis.zrangebyscore(index, score, score)
            entries = [(m, score) for m in sorted((t.decode() for t in ties), reverse=True) if m < after][:count]
        if len(entries) < count:
            raw = await self.redis.zrevrangebyscore(index, f"({score}", oldest, start=0, num=count - len(entries), withscores=True)
            entries += [(member.decode(), int(score)) for member, score in raw]
        return entries
