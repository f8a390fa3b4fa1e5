"""When a webhook delivery is tried again: the retry schedule, a receiver's ``Retry-After``,
and the retries set every webhook worker moves due work from.

The retries set ``<prefix>webhook-retries`` holds ``"<job> <delivery> <attempt>"`` members
scored by when that attempt is due. Two kinds of member share it:

* a retry of a failed attempt, scheduled with the attempt's record (``BLAZE_WEBHOOK_RETRY_SCHEDULE``);
* an attempt in flight, added when a worker claims it and scored by its deadline (the
  receiver's timeout plus ``BLAZE_WEBHOOK_ATTEMPT_MARGIN_S``); recording the attempt
  removes it. One still there past its deadline lost its worker mid-attempt.

``RetryMover``, a thread of every webhook worker, hands due members to the queue, so a retry
hours away survives worker restarts, and a delivery whose worker died is sent again seconds
after its deadline rather than when Redis's visibility timeout returns its message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from email.utils import parsedate_to_datetime

import redis

from blaze_jobs.events import EVENT_FUNCTIONS_LUA
from blaze_jobs.settings import Settings

log = logging.getLogger("blaze_jobs.webhooks")

#: Each retry's delay is drawn within this share either side of its scheduled value.
JITTER = 0.2
#: The longest ``Retry-After`` honoured: a day, the reach of the default schedule.
RETRY_AFTER_MAX_S = 86_400.0
#: Longest a webhook worker sleeps before it looks for due retries again. It wakes sooner
#: for the next one it knows of, and at once when it schedules one itself.
RETRY_POLL_S = 1.0
#: What the record of an attempt lost with its worker says.
LOST_ERROR = "not recorded by its deadline (its webhook worker was lost, or lost Redis, mid-attempt); sent again"


def retries_key(settings: Settings) -> str:
    return settings.key("webhook-retries")


def attempt_member(job_id: str, delivery_id: str, attempt: int) -> str:
    """An attempt's member of the retries set."""
    return f"{job_id} {delivery_id} {attempt}"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), if any."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(attempt: int, schedule: list[float], *, retry_after: float | None = None, rng: random.Random = random) -> float | None:  # type: ignore[assignment]
    """Seconds to wait after failed attempt number ``attempt`` (from 1), or None once the
    schedule is spent. A ``Retry-After`` longer than the schedule's delay wins."""
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * rng.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_MAX_S))
    return delay


# KEYS[1] the retries set. ARGV[1] the prefix, ARGV[2] now, ARGV[3] most to move. Each member
# moves to the webhooks queue exactly once (nothing is queued for a delivery that expired
# with its job). A member whose delivery still holds the claim of an attempt is one in flight
# past its deadline: that attempt is recorded as lost (the receiver may have had it: the
# same webhook-id tells) and the next one queued. Returns how many moved, the due time of
# the next one (false when none is left), and how many were lost in flight.
MOVE_DUE_LUA = EVENT_FUNCTIONS_LUA + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local lost = 0
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local job_id, delivery_id, attempt = string.match(member, '^(%S+) (%S+) (%S+)$')
  -- The job's deliveries hash and order set (events.deliveries_key, delivery_order_key).
  local deliveries = ARGV[1] .. 'job-deliveries:' .. job_id
  local claim = redis.call('HGET', deliveries, delivery_id .. ':claim')
  if claim then
    local delivery = cjson.decode(redis.call('HGET', deliveries, delivery_id))
    local started = cjson.decode(claim)
    if type(delivery['attempts']) ~= 'table' then delivery['attempts'] = {} end
    table.insert(delivery['attempts'], {attempt = tonumber(attempt), at = started['at'], status_code = cjson.null,
      error = '""" + LOST_ERROR + """', duration_ms = (tonumber(ARGV[2]) - started['t']) * 1000})
    delivery['state'] = 'retrying'
    delivery['next_attempt_at'] = nil
    redis.call('HSET', deliveries, delivery_id, cjson.encode(delivery))
    redis.call('HDEL', deliveries, delivery_id .. ':claim')
    redis.call('ZREM', ARGV[1] .. 'job-webhook-order:' .. job_id, delivery_id)
    attempt = tonumber(attempt) + 1
    lost = lost + 1
  end
  if redis.call('EXISTS', deliveries) == 1 then blaze_webhook_task(ARGV[1], job_id, delivery_id, attempt) end
end
local next_one = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, next_one[2] or false, lost}
"""


class RetryMover:
    """A thread of each webhook worker that queues retries once they are due, and sends
    again the deliveries whose worker died mid-attempt."""

    def __init__(self, client: redis.Redis, settings: Settings, *, poll_s: float = RETRY_POLL_S, batch: int = 100) -> None:
        self.settings = settings
        self.poll_s = poll_s
        self.batch = batch
        self._move = client.register_script(MOVE_DUE_LUA)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blaze-webhook-retries", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def wake(self) -> None:
        """A retry was just scheduled: look again now."""
        self._wake.set()

    def move_due(self, *, now: float | None = None) -> tuple[int, float | None]:
        """Queue the retries due by ``now``; how many, and when the next one is due."""
        now = time.time() if now is None else now
        moved, next_due, lost = self._move(keys=[retries_key(self.settings)], args=[self.settings.redis_prefix, repr(now), self.batch])
        if lost:
            log.warning("%d webhook deliveries lost their worker mid-attempt; sent again", lost)
        return int(moved), (float(next_due) if next_due else None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                moved, next_due = self.move_due()
            except redis.RedisError as error:
                log.warning("could not queue due webhook retries: %s", error)
                moved, next_due = 0, None
            if moved >= self.batch:
                continue
            wait = self.poll_s if next_due is None else min(self.poll_s, max(0.0, next_due - time.time()))
            self._wake.wait(wait)
