"""Webhooks: job events POSTed to the URL a job names, signed per the Standard Webhooks spec.

A delivery is recorded, and its Celery task queued, by the Lua step that makes the event
(``events.py``). The task, ``blaze.webhooks.deliver`` on the ``webhooks`` queue, runs
``deliver`` in a webhook worker (``blaze worker --engine webhooks``): one signed POST, the
attempt recorded on the job, and on failure a retry scheduled per
``BLAZE_WEBHOOK_RETRY_SCHEDULE``. Due retries wait in a sorted set, not in Celery's ETA
machinery, so a retry hours away survives worker restarts and is never delivered twice;
``RetryMover`` hands them back to the queue when due.

Receivers check signatures with any Standard Webhooks library, or ``signing.verify``.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Literal, Mapping

import httpcore
import httpx
import redis
from pydantic import BaseModel, Field

# WebhookRefused and check_addresses are named here for api/push.py, which imports them from here.
from blaze_jobs.addresses import WebhookRefused as WebhookRefused
from blaze_jobs.addresses import check_addresses as check_addresses
from blaze_jobs.addresses import resolve
from blaze_jobs.events import EVENT_FUNCTIONS_LUA, deliveries_key, delivery_order_key, event_order
from blaze_jobs.jobs import job_view
from blaze_jobs.settings import Settings
from blaze_jobs.signing import signed_headers, signing_secret

log = logging.getLogger("blaze_jobs.webhooks")

#: Each retry's delay is drawn within this share either side of its scheduled value.
JITTER = 0.2
#: The longest ``Retry-After`` honoured: a day, the reach of the default schedule.
RETRY_AFTER_MAX_S = 86_400.0
#: Longest a webhook worker sleeps before it looks for due retries again. It wakes sooner
#: for the next one it knows of, and at once when it schedules one itself.
RETRY_POLL_S = 1.0
#: How often a delivery looks whether the job's earlier events have had their first attempt,
#: and how long past the receiver's timeout it waits for them at most.
ORDER_POLL_S = 0.005
ORDER_GRACE_S = 5.0
ENDED_STATES = ("succeeded", "failed", "gone", "skipped")


# --- addresses ----------------------------------------------------------------------------


class PublicOnlyBackend(httpcore.SyncBackend):
    """Opens connections only to public addresses, checking the very address it connects
    to, so a DNS answer that changes between a check and the connection (rebinding) cannot
    reach an internal host. TLS still verifies the certificate against the URL's host."""

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **options: Any) -> httpcore.NetworkStream:
        try:
            addresses = check_addresses(host, resolve(host, port))
        except WebhookRefused as refused:
            raise httpcore.ConnectError(f"refused: {refused}") from None
        last: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout=timeout, **options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
        raise last  # type: ignore[misc]


def http_client(settings: Settings) -> httpx.Client:
    """The HTTP client deliveries are sent with: no redirects followed, no proxies from the
    environment, and (unless private addresses are allowed) public addresses only."""
    transport = httpx.HTTPTransport(trust_env=False)
    if not settings.webhook_allow_private:
        # httpx takes no network backend of its own; its pool (httpcore) does.
        transport._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=100, network_backend=PublicOnlyBackend()
        )
    return httpx.Client(
        transport=transport,
        timeout=settings.webhook_timeout_s,
        follow_redirects=False,
        headers={"user-agent": "blaze-jobs-webhooks/1", "content-type": "application/json"},
    )


# --- deliveries ---------------------------------------------------------------------------


class DeliveryAttempt(BaseModel):
    attempt: int = Field(description="1 for the first attempt of the delivery.")
    at: datetime
    status_code: int | None = Field(description="The receiver's HTTP status; null when no answer came.")
    error: str | None = Field(description="Why the attempt failed (non-2xx, redirect, timeout, refused); null on success.")
    duration_ms: float


class Delivery(BaseModel):
    """One event sent to a job's webhook, with every attempt."""

    id: str = Field(description="The event's id, with `.n` appended for its n-th redelivery.")
    type: str = Field(description="`job.started`, `job.progress` or `job.completed`.")
    webhook_id: str = Field(description="The `webhook-id` header: the same on every attempt and redelivery of the event.")
    url: str
    event_at: datetime = Field(description="When the event happened (the body's `timestamp`).")
    state: Literal["pending", "retrying", "succeeded", "failed", "gone", "skipped"] = Field(
        description="`gone`: the receiver answered 410, and the job's later events are `skipped`; "
        "`failed`: every scheduled attempt failed."
    )
    attempts: list[DeliveryAttempt]
    next_attempt_at: datetime | None = Field(None, description="When a `retrying` delivery tries again.")
    redelivery_of: str | None = Field(None, description="The delivery this one sends again.")


class DeliveryPage(BaseModel):
    deliveries: list[Delivery]


def event_body(delivery: dict[str, Any], record: dict[str, str], *, base_url: str) -> bytes:
    """The POSTed JSON; the same bytes on every attempt and redelivery of an event."""
    timestamp = datetime.fromtimestamp(float(delivery["at"]), tz=timezone.utc).isoformat()
    payload = {"type": delivery["type"], "timestamp": timestamp, "data": job_view(record, base_url=base_url)}
    return json.dumps(payload, separators=(",", ":")).encode()


def delivery_list(raw: Mapping[Any, Any]) -> list[dict[str, Any]]:
    """The deliveries in a job's deliveries hash, oldest first, as ``Delivery`` shows them."""
    found = []
    for name, value in raw.items():
        name = name.decode() if isinstance(name, bytes) else name
        if ":" not in name and name != "gone":
            found.append(json.loads(value))
    found.sort(key=lambda d: (float(d["at"]), d["id"]))
    return [
        {
            "id": d["id"],
            "type": d["type"],
            "webhook_id": d["webhook_id"],
            "url": d["url"],
            "event_at": datetime.fromtimestamp(float(d["at"]), tz=timezone.utc).isoformat(),
            "state": d["state"],
            "attempts": d.get("attempts", []),
            "next_attempt_at": d.get("next_attempt_at"),
            "redelivery_of": d.get("redelivery_of"),
        }
        for d in found
    ]


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


# KEYS[1] a job's deliveries hash, KEYS[2] its order set, KEYS[3] the retries set. ARGV[1]
# the delivery id, ARGV[2] its JSON, ARGV[3] "1" when the receiver answered 410 (the job's
# later deliveries are skipped), ARGV[4] a retry to schedule ("" for none) at time ARGV[5].
# Writes only while the deliveries hash exists, so a late write cannot bring back, without
# a TTL, what expired with its job.
SAVE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'gone', '1') end
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4]) end
return 1
"""

# KEYS[1] the retries sorted set. ARGV[1] the prefix, ARGV[2] now, ARGV[3] most to move.
# Members are "job_id delivery_id attempt"; each moves to the webhooks queue exactly once.
# Returns how many moved and the due time of the next one (false when none is left).
MOVE_DUE_LUA = EVENT_FUNCTIONS_LUA + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local job_id, delivery_id, attempt = string.match(member, '^(%S+) (%S+) (%S+)$')
  blaze_webhook_task(ARGV[1], job_id, delivery_id, attempt)
end
local next_one = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, next_one[2] or false}
"""

# KEYS[1] a job's deliveries hash. ARGV[1] the prefix, ARGV[2] the job id, ARGV[3] the
# delivery to send again. Records a new delivery of the same event (same webhook-id and
# body), lifts a receiver's earlier 410, and queues it. Returns the new delivery's JSON.
REDELIVER_LUA = EVENT_FUNCTIONS_LUA + """
local raw = redis.call('HGET', KEYS[1], ARGV[3])
if not raw then return false end
local old = cjson.decode(raw)
local n = redis.call('HINCRBY', KEYS[1], old['event_id'] .. ':redeliveries', 1)
local new_id = old['event_id'] .. '.' .. n
local delivery = cjson.encode({id = new_id, event_id = old['event_id'], type = old['type'], at = old['at'],
  url = old['url'], webhook_id = old['webhook_id'], state = 'pending', redelivery_of = ARGV[3]})
redis.call('HSET', KEYS[1], new_id, delivery, new_id .. ':job', redis.call('HGET', KEYS[1], ARGV[3] .. ':job'))
redis.call('HDEL', KEYS[1], 'gone')
blaze_webhook_task(ARGV[1], ARGV[2], new_id, 1)
return delivery
"""


def retries_key(settings: Settings) -> str:
    return settings.key("webhook-retries")


class Deliverer:
    """What a webhook worker holds: Redis, the HTTP client and the signing secret."""

    def __init__(self, settings: Settings, *, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = client or redis.Redis.from_url(
            settings.redis_url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=10, retry_on_timeout=True
        )
        self.http = http_client(settings)
        self.secret = signing_secret(self.redis, settings)
        self.base_url = (settings.public_url or settings.api_url).rstrip("/")
        self._save_script = self.redis.register_script(SAVE_LUA)
        #: Called after a retry is scheduled (the worker's ``RetryMover.wake``).
        self.retry_scheduled: Callable[[], None] = lambda: None

    def close(self) -> None:
        self.http.close()

    def deliver(self, job_id: str, delivery_id: str) -> str:
        """Make one attempt at a delivery and record it; returns the delivery's new state."""
        key = deliveries_key(self.settings.redis_prefix, job_id)

        # 1. The delivery as recorded, unless it expired with its job or ended already (a
        #    message delivered twice); with the job's 410 flag and its deliveries still
        #    waiting for a first attempt, in the same round trip.
        order = delivery_order_key(self.settings.redis_prefix, job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(key, [delivery_id, f"{delivery_id}:job", "gone"])
            pipe.zrange(order, 0, 9)
            (raw, snapshot, gone), waiting = pipe.execute()
        if raw is None or snapshot is None:
            log.info("delivery %s of job %s is gone (expired with its job)", delivery_id, job_id)
            return "missing"
        delivery = json.loads(raw)
        delivery.setdefault("attempts", [])
        if delivery["state"] in ENDED_STATES:
            return delivery["state"]

        # 2. Events reach a receiver in order: a first attempt waits until the job's earlier
        #    events have had theirs. (A retry may land after later events; ``timestamp`` and
        #    ``data.status`` tell.) A receiver that answered 410 for the job gets nothing more.
        if delivery["state"] == "pending" and not delivery.get("redelivery_of") and _earlier(waiting, delivery):
            self._wait_for_earlier(order, delivery)
            gone = self.redis.hexists(key, "gone")
        if gone:
            delivery["state"] = "skipped"
            self._save(job_id, delivery)
            return "skipped"

        # 3. One signed POST. The body is the same on every attempt; the timestamp is now.
        body = event_body(delivery, json.loads(snapshot), base_url=self.base_url)
        headers = signed_headers(self.secret, msg_id=delivery["webhook_id"], body=body)
        number = len(delivery["attempts"]) + 1
        at, started = time.time(), time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            # Streamed and never read: a receiver's answer body is of no use and could be huge.
            with self.http.stream("POST", delivery["url"], content=body, headers=headers) as response:
                status_code = response.status_code
                retry_after = parse_retry_after(response.headers.get("retry-after"))
        except httpx.TimeoutException:
            error = f"timed out after {self.settings.webhook_timeout_s:g} s"
        except httpx.HTTPError as failure:
            error = f"{type(failure).__name__}: {failure}"
        if status_code is not None and not 200 <= status_code < 300:
            error = f"HTTP {status_code}" + (" (redirects are not followed)" if 300 <= status_code < 400 else "")
        delivery["attempts"].append(
            {
                "attempt": number,
                "at": datetime.fromtimestamp(at, tz=timezone.utc).isoformat(),
                "status_code": status_code,
                "error": error,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )

        # 4. Done, gone, or again later. The retry is scheduled with the attempt recorded.
        retry, due = "", 0.0
        if error is None:
            delivery["state"] = "succeeded"
            delivery.pop("next_attempt_at", None)
        elif status_code == 410:
            delivery["state"] = "gone"
        else:
            delay = retry_delay(number, self.settings.webhook_retry_schedule, retry_after=retry_after)
            if delay is None:
                delivery["state"] = "failed"
            else:
                due = time.time() + delay
                delivery["state"] = "retrying"
                delivery["next_attempt_at"] = datetime.fromtimestamp(due, tz=timezone.utc).isoformat()
                retry = f"{job_id} {delivery_id} {number + 1}"
        self._save(job_id, delivery, gone=status_code == 410, retry=retry, due=due)
        if retry:
            self.retry_scheduled()
        log.info("webhook %s of job %s attempt %d: %s", delivery["type"], job_id, number, error or status_code)
        return delivery["state"]

    def _wait_for_earlier(self, order: str, delivery: dict[str, Any]) -> None:
        # Bounded, so a delivery lost with a dying worker cannot hold back the ones after it.
        deadline = float(delivery["at"]) + self.settings.webhook_timeout_s + ORDER_GRACE_S
        while time.time() < deadline and _earlier(self.redis.zrange(order, 0, 9), delivery):
            time.sleep(ORDER_POLL_S)

    def _save(self, job_id: str, delivery: dict[str, Any], *, gone: bool = False, retry: str = "", due: float = 0.0) -> None:
        prefix = self.settings.redis_prefix
        keys = [deliveries_key(prefix, job_id), delivery_order_key(prefix, job_id), retries_key(self.settings)]
        args = [delivery["id"], json.dumps(delivery, separators=(",", ":")), "1" if gone else "0", retry, repr(due)]
        self._save_script(keys=keys, args=args)


def _earlier(waiting: list[bytes], delivery: dict[str, Any]) -> bool:
    """Whether any of ``waiting`` (event ids) came before ``delivery``'s event."""
    mine = event_order(delivery["event_id"])
    return any(event_order(e.decode()) < mine for e in waiting)


class RetryMover:
    """A thread of each webhook worker that queues retries once they are due."""

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
        moved, next_due = self._move(keys=[retries_key(self.settings)], args=[self.settings.redis_prefix, repr(now), self.batch])
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


_deliverer: Deliverer | None = None
_deliverer_lock = threading.Lock()


def install_deliverer(deliverer: Deliverer) -> None:
    """Make ``deliverer`` the one this process's delivery tasks use (worker start-up)."""
    global _deliverer
    _deliverer = deliverer


def deliver(job_id: str, delivery_id: str) -> str:
    """What the ``blaze.webhooks.deliver`` task does."""
    global _deliverer
    with _deliverer_lock:
        if _deliverer is None:
            from blaze_jobs.settings import get_settings

            _deliverer = Deliverer(get_settings())
    return _deliverer.deliver(job_id, delivery_id)
