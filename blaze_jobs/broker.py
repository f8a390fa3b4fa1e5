"""The Celery messages Blaze Jobs pushes itself: a job's task, and a webhook delivery's.

Both are built here, without Celery, so the API can publish a job with one LPUSH, and the Lua
step that makes an event can queue its webhook delivery (``webhook_task_template``).

``apply_async`` costs about 0.5 ms of CPU per call; this builds the same Celery protocol-2
message that kombu's Redis transport stores (a JSON envelope around a base64 body) and lets
the API push it in the same Redis round trip that stores the job. Ordinary Celery workers
consume it like any other task message; ``tests/test_broker.py`` checks it against the
message Celery itself builds.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from functools import cache
from typing import Any

from blaze_jobs.keys import WEBHOOK_QUEUE, Keys
from blaze_jobs.settings import Settings

#: Flower shows this much of a prompt next to each job.
SUMMARY_CHARS = 60

_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

#: The Celery task that sends one webhook delivery (on ``keys.WEBHOOK_QUEUE``).
DELIVER_TASK = "blaze.webhooks.deliver"


def task_name(engine: str) -> str:
    return f"blaze.{engine}.generate"


def queue_key(settings: Settings, engine: str) -> str:
    """The Redis list kombu reads the engine's queue from (kombu applies the same prefix)."""
    return Keys(settings.redis_prefix).queue(engine)


def summary(input: dict[str, Any]) -> str:
    """A short description of a job for Flower's task list."""
    text = input.get("prompt")
    if not isinstance(text, str):
        text = json.dumps(input, separators=(",", ":"))
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def task_message(
    *,
    job_id: str,
    engine: str,
    input: dict[str, Any],
    tenant: str | None = None,
    faulted_on: list[str] | None = None,
    passes: int = 0,
) -> str:
    """The JSON envelope, as kombu's Redis transport stores it, of the job's Celery task.

    ``tenant`` is the job's: the worker's take moves the job between its tenant's indexes
    without reading the record first (a message without one names the default tenant).
    ``faulted_on`` names the workers the job met a worker fault on, and ``passes`` counts the
    times such a worker put it back for a peer: the task reads them before it takes the job,
    so a worker can pass on a job it faulted without touching the record."""
    args = [job_id]
    kwargs: dict[str, Any] = {"summary": summary(input)}
    if tenant is not None:
        kwargs["tenant"] = tenant
    if faulted_on:
        kwargs["faulted_on"] = faulted_on
    if passes:
        kwargs["passes"] = passes
    body = base64.b64encode(json.dumps([args, kwargs, _EMBED]).encode()).decode()
    # The envelope is the engine's template with this job's values in its slots: a third
    # of the cost of dumping the whole nested dict (this runs on every create).
    # Only the summary (a prompt) needs JSON escaping: ids, base64 and hex never do.
    return _template(engine).format(
        ID=job_id, BODY=body, ARGS=f"['{job_id}']", KWARGS=json.dumps(repr(kwargs))[1:-1], TAG=os.urandom(16).hex()
    )


_TEMPLATES: dict[str, str] = {}
_SLOT = "\x01{}\x01"


def _envelope(*, task: str, task_id: str, body: str, argsrepr: str, kwargsrepr: str, queue: str, tag: str) -> dict[str, Any]:
    """Celery's protocol-2 envelope as kombu's Redis transport stores it (base64 body)."""
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": argsrepr,
            "kwargsrepr": kwargsrepr,
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": tag,
        },
    }


def _template(engine: str) -> str:
    """The engine's envelope as a ``str.format`` template with the slots ID, BODY, ARGS,
    KWARGS and TAG."""
    template = _TEMPLATES.get(engine)
    if template is None:
        slot = _SLOT.format
        envelope = _envelope(
            task=task_name(engine),
            task_id=slot("ID"),
            body=slot("BODY"),
            argsrepr=slot("ARGS"),
            kwargsrepr=slot("KWARGS"),
            queue=engine,
            tag=slot("TAG"),
        )
        # json.dumps writes each \x01 as \u0001, and nothing else in the envelope does.
        parts = json.dumps(envelope).replace("{", "{{").replace("}", "}}").split("\\u0001")
        template = _TEMPLATES[engine] = "".join(part if i % 2 == 0 else "{" + part + "}" for i, part in enumerate(parts))
    return template


#: The slots of ``webhook_task_template``, filled by the Lua that queues a delivery
#: (``lua/events.lua``, ``blaze_webhook_task``) and by ``webhook_task_message``.
WEBHOOK_SLOTS = ("{JOB}", "{DELIVERY}", "{ATTEMPT}")


@cache
def webhook_task_template() -> str:
    """The message of ``DELIVER_TASK(job_id, delivery_id)``, with the slots ``{JOB}``,
    ``{DELIVERY}`` and ``{ATTEMPT}`` for the Lua step that makes the event to fill in (it
    alone knows the delivery id, the event's stream id). The task id, ``<job>:<delivery>:
    <attempt>``, differs per attempt, so a retry is never mistaken for the message it repeats.

    The body is plain JSON, not base64 (kombu reads a body without ``body_encoding`` as is):
    the ids go into it in Lua, which has no base64. Job ids (uuids), stream ids and numbers
    need no JSON escaping, so filling a slot is a plain replacement."""
    job_id, delivery_id, attempt = WEBHOOK_SLOTS
    task_id = f"{job_id}:{delivery_id}:{attempt}"
    envelope = _envelope(
        task=DELIVER_TASK,
        task_id=task_id,
        body=json.dumps([[job_id, delivery_id], {}, _EMBED]),
        argsrepr=repr([job_id, delivery_id]),
        kwargsrepr="{}",
        queue=WEBHOOK_QUEUE,
        tag=task_id,
    )
    del envelope["properties"]["body_encoding"]
    return json.dumps(envelope)


def webhook_task_message(*, job_id: str, delivery_id: str, attempt: int) -> str:
    """The message ``webhook_task_template`` makes for one attempt at a delivery."""
    message = webhook_task_template()
    for slot, value in zip(WEBHOOK_SLOTS, (job_id, delivery_id, str(attempt)), strict=True):
        message = message.replace(slot, value)
    return message


def faulted_workers(record: dict[str, str]) -> list[str]:
    """The workers a stored job met a worker fault on, in order (its ``faulted_on`` field)."""
    return json.loads(record["faulted_on"]) if record.get("faulted_on") else []


def requeue_push(settings: Settings, record: dict[str, str], *, passes: int = 0) -> dict[str, Any]:
    """Where, and what, to push so a stored job (a Redis record) is queued again.

    Kombu takes a queue's messages from its right end. A job that never faulted goes back
    there, to run next (its worker died or stepped aside); one that faulted a worker goes to
    the left end, behind the jobs waiting, so that a poison job is not the next job of the
    worker it just faulted nor the half-open probe of a peer. The message names the job's
    tenant, as its first did."""
    workers = faulted_workers(record)
    message = task_message(
        job_id=record["id"],
        engine=record["engine"],
        input=json.loads(record["input"]),
        # A record from before tenants is the default tenant's (records.tenant_of).
        tenant=record.get("tenant") or settings.default_tenant,
        faulted_on=workers,
        passes=passes,
    )
    push: dict[str, Any] = {"key": queue_key(settings, record["engine"]), "message": message}
    if workers:
        push["back"] = True
    return push
