"""What the job store and its readers share about a job record: the encoding of Redis replies,
index scores and list cursors, expiry, the indexes a new job goes into, and the call of the
status-change script (``lua/transition.lua``).

The store (``store.py``) moves records; the API, the reaper, batches, files and the other
readers of records use these helpers directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from blaze_jobs.broker import webhook_task_template
from blaze_jobs.errors import JobConflict, JobNotFound
from blaze_jobs.events import queue_born_ended
from blaze_jobs.jobs import JobStatus
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings

# Every status change runs ``lua/transition.lua`` (its options are described there); a new
# queued job, ``lua/create.lua``; an attempt dropping its lease, ``lua/release.lua``.


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


#: The job hash's field holding when the job expires (Unix ms): what its hash's PEXPIREAT was
#: given at creation, so its events' keys expire with it whatever retention (or clock) the
#: process that writes them has (``blaze_expire_with_job`` in ``lua/events.lua``).
EXPIRES = "expires_at_ms"


def expires_at_ms(created_at: str, ttl_s: int) -> int:
    """When a job created at ``created_at`` (its field) expires, in Unix ms."""
    return int((float(created_at) + ttl_s) * 1000)


def indexes_of(keys: Keys, *, tenant: str, status: str, engine: str) -> list[str]:
    """The indexes a new job of ``tenant`` in ``status`` goes into: its tenant's (all, the
    status's, the engine's) and, while it is live, the deployment's of its status."""
    indexes = [keys.tenant_all(tenant), keys.tenant_status(tenant, status), keys.tenant_engine(tenant, engine)]
    if not JobStatus(status).ended:
        indexes.append(keys.status(status))
    return indexes


def queue_create(pipe: Any, keys: Keys, record: dict[str, str], *, ttl_s: int) -> None:
    """Queue on a pipeline the commands that store a new job (of ``record["tenant"]``) and
    index it. No admission: a job stored so is born ended (a cache hit) or a test's."""
    score = score_of(float(record["created_at"]))
    expires = expires_at_ms(record["created_at"], ttl_s)
    record = {**record, "score": str(score), EXPIRES: str(expires)}
    key = keys.job(record["id"])
    pipe.hset(key, mapping=record)
    pipe.pexpireat(key, expires)
    for index in indexes_of(keys, tenant=record["tenant"], status=record["status"], engine=record["engine"]):
        pipe.zadd(index, {record["id"]: score})
    if JobStatus(record["status"]).ended:
        queue_born_ended(pipe, keys=keys, job_id=record["id"], ttl_s=ttl_s)


def transition_call(
    keys: Keys,
    job_id: str,
    *,
    tenant: str,
    allowed: Iterable[JobStatus],
    to: JobStatus,
    fields: dict[str, Any],
    lease_key: str | None = None,
    push: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[list[str], list[str]]:
    """The KEYS and ARGV of ``lua/transition.lua`` for one move of a job of ``tenant`` (whose
    status indexes it moves the job between). ``lease_key`` is the job's lease (its own by
    default); ``push`` is ``{key, message, back}``: its key goes in KEYS."""
    spec: dict[str, Any] = {"from": [s.value for s in allowed], "to": to.value, "fields": {k: str(v) for k, v in fields.items()}}
    spec.update({name: value for name, value in options.items() if value})
    script_keys = [*keys.event_keys(job_id), lease_key or keys.lease(job_id), *keys.live_statuses, *keys.tenant_statuses(tenant)]
    if push:
        spec["push"] = {"message": push["message"], "back": bool(push.get("back"))}
        script_keys.append(push["key"])
    return script_keys, [json.dumps(spec, separators=(",", ":")), webhook_task_template()]


def transition_result(job_id: str, reply: list[Any], *, wanted: str) -> str:
    """The status the job left; raises if the job is gone or was in another status."""
    if reply[0] == -1:
        raise JobNotFound(job_id)
    current = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
    if reply[0] == 0:
        raise JobConflict(f"job {job_id} is {current}, cannot become {wanted}")
    return current


def tenant_of(value: Any, settings: Settings) -> str:
    """The tenant a job's ``tenant`` field (str, bytes or None) names: records written before
    jobs had tenants belong to ``BLAZE_DEFAULT_TENANT``."""
    return text(value) if value else settings.default_tenant


def text(value: Any) -> str:
    """A Redis reply (bytes, as these clients return them) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
