"""Where queued work stands: each engine's queue (how many messages wait in it, and how long
the job at its head has waited), and one queued job's place in its engine's queue.

Both are read from Redis at each request, from the lists kombu keeps (``keys.Keys.queue``):
a queue costs an LLEN and an LINDEX, a place a scan of what lies ahead of the job
(``lua/queue_position.lua``), bounded by ``POSITION_SCAN``. ``blaze top`` and ``blaze submit
--wait`` read them; any caller may, since a queue's length says nothing of whose jobs wait
(the job at a queue's head is named only to its tenant's keys and to admin keys).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from blaze_jobs import scripts
from blaze_jobs.jobs import JobStatus
from blaze_jobs.keys import WEBHOOK_QUEUE, Keys
from blaze_jobs.records import tenant_of, text
from blaze_jobs.settings import ENGINES

from .auth import Caller
from .problems import PROBLEM_JSON, PROBLEM_SCHEMA
from .request_context import settings_of
from .responses import JSONResponse
from .waits import owned

PROBLEM = {"content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}, "description": "A problem+json body naming the fault."}

router = APIRouter(responses={401: PROBLEM})

#: The most messages a job's place is looked for among. The scan runs inside Redis, which
#: serves nobody else meanwhile: measured here (2 cores, load ~5, 1.2 KB messages) at about
#: 4.5 us per message looked at, 0.5 ms for place 100, 2.3 ms at this bound. A job farther
#: back is told only that it is farther back.
POSITION_SCAN = 500
#: Messages the scan's first LRANGE reads (each next one reads twice as many): a job near the
#: head costs one short read.
SCAN_CHUNK = 8
#: The most messages one LRANGE of the scan reads, and the most bytes of messages it looks at
#: in all: a message may carry an input of up to BLAZE_MAX_INPUT_BYTES, and 500 of those
#: copied into the script at once would hold Redis for a long while.
SCAN_CHUNK_MAX = 64
SCAN_BYTES = 8_388_608


class Queue(BaseModel):
    """One engine's queue."""

    engine: str = Field(description="The engine whose workers take from this queue.")
    depth: int = Field(
        description="Messages waiting in the queue. A job canceled while queued keeps its message "
        "until a worker takes it and drops it, so it is counted until then."
    )
    oldest_job_id: str | None = Field(
        description="The job at the queue's head (the next one a worker takes); null when the queue is empty, "
        "and for a job of another tenant unless the key is an admin's."
    )
    oldest_age_s: float | None = Field(
        description="Seconds since the job at the head was created (null when the queue is empty or that job "
        "has expired). A job handed back after a worker fault is at the tail, not the head."
    )


class QueueList(BaseModel):
    queues: list[Queue] = Field(description="Every engine's queue, in the deployment's engine order.")


class JobPosition(BaseModel):
    """A job's place in its engine's queue."""

    id: str
    engine: str
    status: JobStatus
    position: int | None = Field(
        description="1 for the next message a worker takes, 2 for the one after it …; null when the job is not "
        "queued, when its message was taken a moment ago, or when it lies farther back than `scan_limit` messages."
    )
    depth: int = Field(description="Messages waiting in the engine's queue, this job's among them while it is queued.")
    scan_limit: int = Field(description="How far back the place is looked for (`position` is null beyond it).")


def head_job_id(message: bytes | str | None) -> str | None:
    """The job id of a queue's message (a Celery envelope names its task, which is the job)."""
    if not message:
        return None
    try:
        envelope: Any = json.loads(message)
        job_id = envelope["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None  # not a message Blaze Jobs or Celery wrote: nothing to say of its age
    return job_id if isinstance(job_id, str) else None


@dataclass(frozen=True)
class QueueHead:
    """A queue as Redis holds it now: its depth, and the job at its head (the next taken)."""

    name: str
    depth: int
    job_id: str | None
    #: When the head job was created (a delivery: when its event happened); None if unknown.
    created_at: float | None
    tenant: str | None


async def queue_heads(client: Any, keys: Keys, names: Iterable[str]) -> list[QueueHead]:
    """Each named queue's depth and head, in two round trips: what ``GET /v1/queues`` answers
    and the API's queue gauges (``api/metrics.py``) report."""
    names = list(names)
    # 1. Each queue's length and head, in one round trip.
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(keys.queue(name))
            pipe.lindex(keys.queue(name), -1)  # kombu takes from the right
        replies = await pipe.execute()
    depths, heads = replies[0::2], [head_job_id(m) for m in replies[1::2]]
    # 2. When each head job was created, and whose it is, in a second one.
    async with client.pipeline(transaction=False) as pipe:
        for name, job_id in zip(names, heads, strict=True):
            pipe.hmget(keys.job(_job_of_message(name, job_id) or ""), ["created_at", "tenant"])
        found = await pipe.execute()
    queues = []
    for name, depth, head, (at, tenant) in zip(names, depths, heads, found, strict=True):
        created_at = float(text(at)) if head and at else None
        if name == WEBHOOK_QUEUE and head:
            created_at = _event_time(head)
        queues.append(QueueHead(name, int(depth), head, created_at, text(tenant) if tenant else None))
    return queues


def _job_of_message(queue: str, task_id: str | None) -> str | None:
    # A delivery's task id is ``<job>:<delivery>:<attempt>`` (``broker.webhook_task_template``).
    return task_id.split(":", 1)[0] if task_id and queue == WEBHOOK_QUEUE else task_id


def _event_time(task_id: str) -> float | None:
    # The delivery id is the event's stream id, ``<milliseconds>-<sequence>``.
    parts = task_id.split(":")
    millis = parts[1].partition("-")[0] if len(parts) == 3 else ""
    return int(millis) / 1000 if millis.isdigit() else None


@router.get("/v1/queues", response_model=QueueList)
async def list_queues(request: Request, caller: Caller) -> JSONResponse:
    """Each engine's queue: its depth, and the job at its head with the time it has waited."""
    settings = settings_of(request.app)
    heads = await queue_heads(request.app.state.redis, Keys(settings.redis_prefix), ENGINES)
    now = time.time()
    queues = []
    for head in heads:
        # Another tenant's job is not even named to a caller (an admin sees every tenant's).
        yours = caller.admin or tenant_of(head.tenant, settings) == caller.tenant
        age = round(max(0.0, now - head.created_at), 3) if head.created_at is not None else None
        queues.append(
            {"engine": head.name, "depth": head.depth, "oldest_job_id": head.job_id if yours else None, "oldest_age_s": age}
        )
    return JSONResponse({"queues": queues})


@router.get("/v1/jobs/{job_id}/position", response_model=JobPosition, responses={404: PROBLEM})
async def job_position(request: Request, caller: Caller, job_id: str) -> JSONResponse:
    """The job's place in its engine's queue while it is queued (1: the next one taken)."""
    settings = settings_of(request.app)
    record = owned(await request.app.state.store.get(job_id), job_id, tenant=caller.tenant, settings=settings)
    queue = Keys(settings.redis_prefix).queue(record["engine"])
    client = request.app.state.redis
    position: int | None = None
    if record["status"] == JobStatus.queued.value:
        # The job's own message carries its id as a header: `"id": "<job id>"`, quotes and all,
        # which no other message holds (a prompt's quotes are escaped inside its envelope).
        marker = json.dumps({"id": job_id})[1:-1]
        place, depth = await scripts.script(client, "queue_position")(
            keys=[queue], args=[marker, POSITION_SCAN, SCAN_CHUNK, SCAN_CHUNK_MAX, SCAN_BYTES]
        )
        position = int(place) or None
    else:
        depth = await client.llen(queue)
    view = {
        "id": job_id,
        "engine": record["engine"],
        "status": record["status"],
        "position": position,
        "depth": int(depth),
        "scan_limit": POSITION_SCAN,
    }
    return JSONResponse(view)
