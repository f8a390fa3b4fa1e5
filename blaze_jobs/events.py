"""Job events: what happened to a job, in order, for long-poll, server-sent events and webhooks.

Every event is an entry of the job's Redis stream ``<prefix>job-stream:<id>``, bounded in
length and expiring with the job. The stream entry id is the event id: SSE hands it out as
``id:``, and a client that reconnects with ``Last-Event-ID`` reads on from it. Readers block
on the stream (``XREAD BLOCK``), so nothing polls.

Events are written by Lua, in the same atomic step as the change they report:

* a status change (``TRANSITION_LUA`` in ``store.py`` calls ``blaze_status_event``): the
  types are ``job.queued`` (handed back to the queue), ``job.started`` and
  ``job.completed`` (succeeded, failed or canceled); the entry holds the job as it stood,
  all but its input (which never changes: a reader has it from the job record, and a
  large input is not copied at every event), so a reader never sees a later state under
  an earlier event;
* progress and other running-job events (``APPEND_LUA``), e.g. ``job.progress``, and a text
  job's ``job.delta``, one per piece of text (``TextStream``); a cancel ends a text job with
  the pieces it streamed, so its ``job.completed`` and its record hold the same text.

A stream keeps every event a job can make within the deployment's bounds
(``stream_maxlen``), so ``Last-Event-ID: 0-0`` replays it whole; only appended events trim it.

When the job has a webhook that wants the event, the same step records a delivery and
pushes the Celery task that sends it (``blaze.webhooks.deliver`` on the ``webhooks``
queue): a worker that dies right after finishing a job cannot lose the job's webhook.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import redis

from blaze_jobs.settings import Settings, get_settings

log = logging.getLogger("blaze_jobs.events")

#: The Celery task that sends one webhook delivery, and its queue.
DELIVER_TASK = "blaze.webhooks.deliver"
WEBHOOK_QUEUE = "webhooks"
COMPLETED = "job.completed"


def stream_key(prefix: str, job_id: str) -> str:
    return f"{prefix}job-stream:{job_id}"


def deliveries_key(prefix: str, job_id: str) -> str:
    return f"{prefix}job-deliveries:{job_id}"


def delivery_order_key(prefix: str, job_id: str) -> str:
    return f"{prefix}job-webhook-order:{job_id}"


def event_order(event_id: str) -> tuple[int, ...]:
    """A stream id as a sortable tuple: ``"1718000000000-2"`` -> ``(1718000000000, 2)``."""
    return tuple(int(part) for part in event_id.split("-"))


# Lua functions the scripts below (and TRANSITION_LUA) start with. Names carry a ``blaze_``
# prefix because they share the script's scope with the caller's own locals.
EVENT_FUNCTIONS_LUA = """
local function blaze_snapshot(job_key, with_input)
  local flat = redis.call('HGETALL', job_key)
  local record = {}
  for i = 1, #flat, 2 do
    if with_input or flat[i] ~= 'input' then record[flat[i]] = flat[i + 1] end
  end
  return cjson.encode(record)
end

-- The Celery protocol-2 message of blaze.webhooks.deliver(job_id, delivery_id), as kombu's
-- Redis transport stores it; the body is plain JSON (no body_encoding), which kombu reads as is.
local function blaze_webhook_task(prefix, job_id, delivery_id, attempt)
  local task_id = job_id .. ':' .. delivery_id .. ':' .. attempt
  local body = cjson.encode({{job_id, delivery_id}, {}, {callbacks = cjson.null, errbacks = cjson.null, chain = cjson.null, chord = cjson.null}})
  local message = cjson.encode({
    body = body,
    ['content-encoding'] = 'utf-8',
    ['content-type'] = 'application/json',
    headers = {
      lang = 'py', task = '""" + DELIVER_TASK + """', id = task_id, shadow = cjson.null, eta = cjson.null,
      expires = cjson.null, group = cjson.null, group_index = cjson.null, retries = 0,
      timelimit = {cjson.null, cjson.null}, root_id = task_id, parent_id = cjson.null,
      argsrepr = "['" .. job_id .. "', '" .. delivery_id .. "']", kwargsrepr = '{}',
      origin = 'blaze-jobs', ignore_result = true
    },
    properties = {
      correlation_id = task_id, delivery_mode = 2, priority = 0, delivery_tag = task_id,
      delivery_info = {exchange = '', routing_key = '""" + WEBHOOK_QUEUE + """'}
    }
  })
  redis.call('LPUSH', prefix .. '""" + WEBHOOK_QUEUE + """', message)
end

-- Append an event to the job's stream (trimmed to about maxlen entries, when given); when the
-- job's webhook wants it, record a delivery (with the whole job as it stands, input
-- included, since a delivery's body is the job) and queue its task. Returns the event id.
local function blaze_event(job_key, prefix, job_id, kind, fields, maxlen)
  local now = redis.call('TIME')
  local at = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
  local entry = {'type', kind, 'at', at}
  for name, value in pairs(fields) do entry[#entry + 1] = name; entry[#entry + 1] = value end
  local stream = prefix .. 'job-stream:' .. job_id
  local event_id
  if maxlen then
    event_id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(entry))
  else
    event_id = redis.call('XADD', stream, '*', unpack(entry))
  end
  local ttl = redis.call('PTTL', job_key)
  if ttl > 0 then redis.call('PEXPIRE', stream, ttl) end
  local hook = redis.call('HMGET', job_key, 'webhook', 'webhook_events')
  if hook[1] and string.find(',' .. (hook[2] or '') .. ',', ',' .. string.sub(kind, 5) .. ',', 1, true) then
    local deliveries = prefix .. 'job-deliveries:' .. job_id
    if redis.call('HEXISTS', deliveries, 'gone') == 0 then
      local delivery = cjson.encode({id = event_id, event_id = event_id, type = kind, at = at, url = hook[1],
        webhook_id = 'msg_' .. job_id .. '_' .. event_id, state = 'pending'})
      redis.call('HSET', deliveries, event_id, delivery, event_id .. ':job', blaze_snapshot(job_key, true))
      -- Deliveries whose first attempt is still to come, so each goes after the ones before it.
      local order = prefix .. 'job-webhook-order:' .. job_id
      redis.call('ZADD', order, string.match(event_id, '^(%d+)'), event_id)
      if ttl > 0 then redis.call('PEXPIRE', deliveries, ttl); redis.call('PEXPIRE', order, ttl) end
      blaze_webhook_task(prefix, job_id, event_id, 1)
    end
  end
  return event_id
end

-- A text job canceled while it streams ends with the text it streamed: its job.delta pieces
-- since its attempt started, with the rest of the output (usage, seed) as the last piece
-- left it in the job's partial_output. Nothing streamed, no output.
local function blaze_streamed_output(job_key, prefix, job_id)
  local partial = redis.call('HGET', job_key, 'partial_output')
  if not partial then return end
  local pieces = {}
  for _, entry in ipairs(redis.call('XREVRANGE', prefix .. 'job-stream:' .. job_id, '+', '-')) do
    local kind, text
    local flat = entry[2]
    for i = 1, #flat, 2 do
      if flat[i] == 'type' then kind = flat[i + 1] elseif flat[i] == 'text' then text = flat[i + 1] end
    end
    if kind == 'job.started' then break end
    if kind == 'job.delta' and text then pieces[#pieces + 1] = text end
  end
  if #pieces == 0 then return end
  local n = #pieces
  for i = 1, math.floor(n / 2) do pieces[i], pieces[n + 1 - i] = pieces[n + 1 - i], pieces[i] end
  local output = cjson.decode(partial)
  output['text'] = table.concat(pieces)
  output['finish_reason'] = 'canceled'
  redis.call('HSET', job_key, 'output', cjson.encode(output))
end

local function blaze_status_event(job_key, prefix, job_id, status)
  local kind = 'job.completed'
  if status == 'queued' then kind = 'job.queued' elseif status == 'running' then kind = 'job.started' end
  -- Throttled progress may stop short of the last step; a success completes it.
  local progress = redis.call('HGET', job_key, 'progress')
  if progress and status == 'succeeded' then
    local p = cjson.decode(progress)
    p['step'] = p['total']
    redis.call('HSET', job_key, 'progress', cjson.encode(p))
  end
  -- Status changes are bounded by the job's attempts: they never trim the stream.
  return blaze_event(job_key, prefix, job_id, kind, {job = blaze_snapshot(job_key, false)}, nil)
end
"""

# KEYS[1] the job hash. ARGV[1] the key prefix, ARGV[2] the event type, ARGV[3] a JSON object
# of the event's fields, ARGV[4] a JSON object of job fields to set with it, ARGV[5] the
# stream's length bound (``stream_maxlen``). Only a running job takes such events (a late
# progress report cannot land after the job's end). Returns the event id, or nil when the
# job was not running.
APPEND_LUA = EVENT_FUNCTIONS_LUA + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return false end
local args = {}
for name, value in pairs(cjson.decode(ARGV[4])) do args[#args + 1] = name; args[#args + 1] = value end
if #args > 0 then redis.call('HSET', KEYS[1], unpack(args)) end
return blaze_event(KEYS[1], ARGV[1], redis.call('HGET', KEYS[1], 'id'), ARGV[2], cjson.decode(ARGV[3]), ARGV[5])
"""

# KEYS[1] the hash of a job stored already ended (a cache hit at creation). ARGV[1] the prefix.
BORN_ENDED_LUA = EVENT_FUNCTIONS_LUA + """
return blaze_status_event(KEYS[1], ARGV[1], redis.call('HGET', KEYS[1], 'id'), redis.call('HGET', KEYS[1], 'status'))
"""


def stream_maxlen(settings: Settings) -> int:
    """Entries a job's stream keeps: every event a job can make within the bounds. Each
    attempt starts and ends (two status changes) and adds at most one text piece per new
    token and one progress report per step or token."""
    per_attempt = 2 + settings.llm_max_new_tokens + max(settings.llm_max_new_tokens, settings.max_steps)
    # The margin: a cancel, a birth already ended, hand-backs that count no attempt.
    return settings.max_attempts * per_attempt + 16


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
    script = client.register_script(APPEND_LUA)  # EVALSHA, loading the script once per server
    maxlen = stream_maxlen(settings or get_settings())
    reply = script(keys=[f"{prefix}job:{job_id}"], args=[prefix, kind, json.dumps(fields), json.dumps(job_fields or {}), maxlen])
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
        append_event(self.redis, prefix=self.prefix, job_id=self.job_id, kind="job.delta", fields=fields, job_fields=job, settings=self.settings)


def queue_born_ended(pipe: Any, *, prefix: str, job_key: str) -> None:
    """Queue on ``pipe``, after the commands that store a job born ended, its ``job.completed``."""
    # EVAL: this path is rare, and EVALSHA in a pipeline would first ask SCRIPT EXISTS.
    pipe.eval(BORN_ENDED_LUA, 1, job_key, prefix)


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's stream."""

    id: str  # the stream entry id, e.g. "1718000000000-0"
    type: str  # job.queued, job.started, job.progress, job.completed, …
    at: float  # Unix time the event happened
    fields: dict[str, str]

    @property
    def record(self) -> dict[str, str] | None:
        """The job as it stood at a status change (None for other events)."""
        raw = self.fields.get("job")
        return json.loads(raw) if raw else None

    @classmethod
    def parse(cls, entry_id: Any, raw: dict[Any, Any]) -> "JobEvent":
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return cls(id=_text(entry_id), type=fields.pop("type", ""), at=float(fields.pop("at", 0) or 0), fields=fields)


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


async def job_and_position(client: Any, *, prefix: str, job_id: str) -> tuple[dict[str, str], str]:
    """The job and the id of its latest event, read together (``"0-0"`` before any event),
    so that reading the stream on from that id misses nothing and repeats nothing."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(f"{prefix}job:{job_id}")
        pipe.xrevrange(stream_key(prefix, job_id), count=1)
        raw, last = await pipe.execute()
    record = {_text(k): _text(v) for k, v in raw.items()}
    return record, (_text(last[0][0]) if last else "0-0")


async def events_between(client: Any, key: str, *, after: str, until: str) -> list[JobEvent]:
    """The events of stream ``key`` after ``after``, up to and including ``until``."""
    entries = await client.xrange(key, min=f"({after}", max=until)
    return [JobEvent.parse(entry_id, raw) for entry_id, raw in entries]


# --- progress -----------------------------------------------------------------------------


class ProgressReporter:
    """Sends running jobs' progress from a thread of its own, at most once per ``interval_s``
    per job (the latest step wins), so a denoising step pays a dict assignment, never a
    Redis round trip."""

    def __init__(self, client: redis.Redis, *, prefix: str, interval_s: float, maxlen: int | None = None) -> None:
        self.redis = client
        self.prefix = prefix
        self.interval_s = interval_s
        self.maxlen = maxlen or stream_maxlen(get_settings())  # the stream's bound
        self._append = client.register_script(APPEND_LUA)
        self._pending: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blaze-progress", daemon=True)
        self._thread.start()

    def report(self, job_id: str, step: int, total: int) -> None:
        with self._lock:
            self._pending[job_id] = (step, total)
        self._wake.set()

    def callback(self, job_id: str) -> Callable[[int, int], None]:
        """The ``on_progress`` of one job's engine request."""
        return lambda step, total: self.report(job_id, step, total)

    def flush(self) -> None:
        """Send what is pending now (tests and shutdown)."""
        with self._lock:
            batch, self._pending = self._pending, {}
            self._wake.clear()
        if not batch:
            return
        try:
            self._send(batch)
        except redis.exceptions.NoScriptError:  # first use, or Redis restarted and forgot it
            self.redis.script_load(APPEND_LUA)
            self._send(batch)

    def _send(self, batch: dict[str, tuple[int, int]]) -> None:
        # EVALSHA in a plain pipeline: one round trip (a pipeline given a Script object
        # would ask first whether the script is loaded, every time).
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, (step, total) in batch.items():
                progress = json.dumps({"step": step, "total": total}, separators=(",", ":"))
                fields = json.dumps({"progress": progress})
                pipe.evalsha(self._append.sha, 1, f"{self.prefix}job:{job_id}", self.prefix, "job.progress", fields, fields, self.maxlen)
            pipe.execute()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            try:
                self.flush()
            except redis.RedisError as error:  # progress is best effort; the job goes on
                log.warning("could not report progress: %s", error)
            self._stop.wait(self.interval_s)


_reporter: ProgressReporter | None = None
_reporter_lock = threading.Lock()


def progress_callback(client: redis.Redis, settings: Settings, job_id: str) -> Callable[[int, int], None] | None:
    """The step callback that reports ``job_id``'s progress through this process's reporter,
    or None when ``BLAZE_PROGRESS_INTERVAL_S`` turns progress off."""
    global _reporter
    if settings.progress_interval_s <= 0:
        return None
    with _reporter_lock:
        if _reporter is None:
            _reporter = ProgressReporter(
                client, prefix=settings.redis_prefix, interval_s=settings.progress_interval_s, maxlen=stream_maxlen(settings)
            )
    return _reporter.callback(job_id)
