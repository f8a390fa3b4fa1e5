"""When a webhook delivery is tried again: the retry schedule, a receiver's ``Retry-After``,
and the retries set every webhook worker moves due work from.

The retries set (``keys.Keys.webhook_retries``) holds ``"<job> <delivery> <attempt>"`` members
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

from blaze_jobs import scripts
from blaze_jobs.broker import webhook_task_template
from blaze_jobs.keys import WEBHOOK_QUEUE, Keys
from blaze_jobs.settings import Settings

log = logging.getLogger("blaze_jobs.webhooks")

#: ``BLAZE_WEBHOOK_RETRY_POLL_S``'s default, named for the chaos test's bound.
RETRY_POLL_S: float = Settings.model_fields["webhook_retry_poll_s"].default
#: What the record of an attempt lost with its worker says.
LOST_ERROR = "not recorded by its deadline (its webhook worker was lost, or lost Redis, mid-attempt); sent again"


def retries_key(settings: Settings) -> str:
    return Keys(settings.redis_prefix).webhook_retries


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


_DEFAULTS = Settings.model_fields


def retry_delay(
    attempt: int,
    schedule: list[float],
    *,
    retry_after: float | None = None,
    rng: random.Random = random,  # type: ignore[assignment]
    jitter: float = _DEFAULTS["webhook_retry_jitter"].default,
    retry_after_max_s: float = _DEFAULTS["webhook_retry_after_max_s"].default,
) -> float | None:
    """Seconds to wait after failed attempt number ``attempt`` (from 1), or None once the
    schedule is spent. A ``Retry-After`` longer than the schedule's delay wins, up to
    ``retry_after_max_s``; ``jitter`` is ``BLAZE_WEBHOOK_RETRY_JITTER``."""
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * rng.uniform(1 - jitter, 1 + jitter)
    if retry_after is not None:
        delay = max(delay, min(retry_after, retry_after_max_s))
    return delay


class RetryMover:
    """A thread of each webhook worker that queues retries once they are due, and sends
    again the deliveries whose worker died mid-attempt."""

    def __init__(self, client: redis.Redis, settings: Settings, *, poll_s: float | None = None, batch: int = 100) -> None:
        self.redis = client
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.poll_s = settings.webhook_retry_poll_s if poll_s is None else poll_s
        self.batch = batch
        self._move = scripts.script(client, "move_due")
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
        retries = self.keys.webhook_retries
        # Read what is due (and, for an idle look, when the next one is: one round trip), then
        # move it in one script that takes each member's keys in KEYS. A member another webhook
        # worker moved in between is no longer in the set, and skipped.
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(retries, "-inf", repr(now), start=0, num=self.batch)
            pipe.zrange(retries, 0, 0, withscores=True)
            raw_due, next_one = pipe.execute()
        if not raw_due:
            return 0, (float(next_one[0][1]) if next_one else None)
        due = [m.decode() for m in raw_due]
        script_keys = [retries, self.keys.queue(WEBHOOK_QUEUE)]
        for member in due:
            job_id = member.split(" ", 1)[0]
            script_keys += [self.keys.deliveries(job_id), self.keys.webhook_order(job_id)]
        moved, lost = self._move(keys=script_keys, args=[webhook_task_template(), repr(now), LOST_ERROR, *due])
        if lost:
            log.warning("%d webhook deliveries lost their worker mid-attempt; sent again", lost)
        next_one = self.redis.zrange(retries, 0, 0, withscores=True)
        return int(moved), (float(next_one[0][1]) if next_one else None)

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
