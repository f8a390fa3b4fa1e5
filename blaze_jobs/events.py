"""Job events: what happened to a job, in order, for long-poll, server-sent events and webhooks.

Every event is an entry of the job's Redis stream (``keys.Keys.stream``), bounded in
length and expiring with the job. The stream entry id is the event id: SSE hands it out as
``id:``, and a client that reconnects with ``Last-Event-ID`` reads on from it. Readers block
on the stream (``XREAD BLOCK``), so nothing polls.

Events are written by Lua, in the same atomic step as the change they report:

* a status change (``lua/transition.lua`` calls ``blaze_status_event``, ``lua/events.lua``): the
  types are ``job.queued`` (handed back to the queue), ``job.started`` and
  ``job.completed`` (succeeded, failed or canceled); the entry holds the job as it stood,
  all but its input (which never changes: a reader has it from the job record, and a
  large input is not copied at every event), so a reader never sees a later state under
  an earlier event;
* progress and other running-job events (``lua/append.lua``), e.g. ``job.progress`` (sent by
  ``progress.py``), and a text
  job's ``job.delta``, one per piece of text (``TextStream``); a cancel ends a text job with
  the pieces it streamed, so its ``job.completed`` and its record hold the same text.

A stream keeps every event a job can make within the deployment's bounds
(``stream_maxlen``), so ``Last-Event-ID: 0-0`` replays it whole; only appended events trim it.

When the job has a webhook that wants the event, the same step records a delivery
(``deliveries.py``) and pushes the Celery task that sends it (``broker.webhook_task_template``
on the ``webhooks`` queue): a worker that dies right after finishing a job cannot lose the
job's webhook.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from blaze_jobs import scripts
from blaze_jobs.broker import DELIVER_TASK as DELIVER_TASK  # named here for tasks.py and the tests
from blaze_jobs.broker import webhook_task_template
from blaze_jobs.keys import WEBHOOK_QUEUE as WEBHOOK_QUEUE  # named here for workers/webhooks.py
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings, get_settings

COMPLETED = "job.completed"
#: The job hash's field that holds the id of its latest event (``lua/events.lua``).
POSITION = "event"


def stream_key(prefix: str, job_id: str) -> str:
    return Keys(prefix).stream(job_id)


def event_order(event_id: str) -> tuple[int, ...]:
    """A stream id as a sortable tuple: ``"1718000000000-2"`` -> ``(1718000000000, 2)``."""
    return tuple(int(part) for part in event_id.split("-"))


def stream_maxlen(settings: Settings) -> int:
    """Entries a job's stream keeps: every event a job can make within the bounds. Each
    attempt starts and ends (two status changes) and adds at most one text piece per new
    token and one progress report per step or token."""
    per_attempt = 2 + settings.llm_max_new_tokens + max(settings.llm_max_new_tokens, settings.max_steps)
    return settings.max_attempts * per_attempt + settings.event_stream_margin


def append_event(
    client: redis.Redis,
    *,
    prefix: str,
    job_id: str,
    kind: str,
    fields: dict[str, str],
    job_fields: dict[str, str] | None = None,
    settings: Settings | None = None,
) -> str | None:
    """Append an event (e.g. ``job.delta`` with ``{"text": text}``) to a running job's
    stream, setting ``job_fields`` on the job in the same step; None if it was not running.
    Its webhook gets it when its filter names the part after ``job.``. The stream's bound
    comes from ``settings`` (the process's own by default)."""
    settings = settings or get_settings()
    args = [
        kind,
        json.dumps(fields),
        json.dumps(job_fields or {}),
        stream_maxlen(settings),
        webhook_task_template(),
        settings.job_ttl_s,
    ]
    reply = scripts.script(client, "append")(keys=Keys(prefix).event_keys(job_id), args=args)
    return _text(reply) if reply is not None else None


class TextStream:
    """One text job's pieces of text, each a ``job.delta`` event, with the output so far
    but its text (``on_partial``, just before each piece) kept on the job in the same step:
    a cancel ends the job with the text streamed until then (``blaze_streamed_output``)."""

    def __init__(self, client: redis.Redis, *, prefix: str, job_id: str, settings: Settings) -> None:
        self.redis, self.prefix, self.job_id, self.settings = client, prefix, job_id, settings
        self._partial: dict[str, str] | None = None

    def on_partial(self, fields: dict[str, Any]) -> None:
        self._partial = {"partial_output": json.dumps(fields, separators=(",", ":"))}

    def on_delta(self, text: str) -> None:
        fields, job = {"text": text}, self._partial
        append_event(
            self.redis,
            prefix=self.prefix,
            job_id=self.job_id,
            kind="job.delta",
            fields=fields,
            job_fields=job,
            settings=self.settings,
        )


def queue_born_ended(pipe: Any, *, keys: Keys, job_id: str, ttl_s: int) -> None:
    """Queue on ``pipe``, after the commands that store a job born ended, its ``job.completed``."""
    # EVAL: this path is rare, and EVALSHA in a pipeline would first ask SCRIPT EXISTS.
    script_keys = keys.event_keys(job_id)
    pipe.eval(scripts.source("born_ended"), len(script_keys), *script_keys, webhook_task_template(), ttl_s)


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's stream."""

    id: str  # the stream entry id, e.g. "1718000000000-0"
    type: str  # job.queued, job.started, job.progress, job.completed, …
    at: float  # Unix time the event happened (its stream id's, to the ms)
    fields: dict[str, str]

    @property
    def record(self) -> dict[str, str] | None:
        """The job as it stood at a status change (None for other events)."""
        raw = self.fields.get("job")
        return json.loads(raw) if raw else None

    @classmethod
    def parse(cls, entry_id: Any, raw: dict[Any, Any]) -> JobEvent:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        event_id = _text(entry_id)
        # The id is the time Redis appended the event, in ms (entries of older releases also
        # carry an ``at`` field, in µs).
        at = float(fields.pop("at", 0) or 0) or event_order(event_id)[0] / 1000
        return cls(id=event_id, type=fields.pop("type", ""), at=at, fields=fields)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def apply(record: dict[str, str], event: JobEvent) -> dict[str, str]:
    """The job after ``event``, given the job before it: a status change carries every field
    but the input (which never changes), progress carries the progress."""
    snapshot = event.record
    if snapshot is not None:
        return {"input": record.get("input", "null"), **snapshot}
    if "progress" in event.fields:
        return {**record, "progress": event.fields["progress"]}
    return record


def ended(record: dict[str, str]) -> bool:
    return record.get("status") in ("succeeded", "failed", "canceled")


def position_of(record: dict[str, str]) -> str:
    """The id of the job's latest event, from its record (``"0-0"`` before any event), taken
    out of the record: the job's ``event`` field is a reader's position, not part of the job."""
    return record.pop(POSITION, None) or "0-0"


async def job_and_position(client: Any, *, prefix: str, job_id: str) -> tuple[dict[str, str], str]:
    """The job and the id of its latest event, read together (``"0-0"`` before any event),
    so that reading the stream on from that id misses nothing and repeats nothing: every
    script that appends an event writes its id to the job (``event``) in the same step, so
    one HGETALL reads both."""
    keys = Keys(prefix)
    raw = await client.hgetall(keys.job(job_id))
    record = {_text(k): _text(v) for k, v in raw.items()}
    if POSITION in record or not _may_have_events(record):
        return record, position_of(record)
    # A job whose last event was written before its record kept its id: read both, as before.
    async with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.job(job_id))
        pipe.xrevrange(keys.stream(job_id), count=1)
        raw, last = await pipe.execute()
    record = {_text(k): _text(v) for k, v in raw.items()}
    record.pop(POSITION, None)
    return record, (_text(last[0][0]) if last else "0-0")


def _may_have_events(record: dict[str, str]) -> bool:
    # A job made no event until a worker took it or it was born ended.
    return bool(record) and (record.get("status") != "queued" or (record.get("attempts") or "0") != "0")


async def events_between(client: Any, key: str, *, after: str, until: str) -> list[JobEvent]:
    """The events of stream ``key`` after ``after``, up to and including ``until``."""
    entries = await client.xrange(key, min=f"({after}", max=until)
    return [JobEvent.parse(entry_id, raw) for entry_id, raw in entries]
