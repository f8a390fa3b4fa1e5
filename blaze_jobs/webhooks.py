"""Webhooks: job events POSTed to the URL a job names, signed per the Standard Webhooks spec.

A delivery is recorded, and its Celery task queued, by the Lua step that makes the event
(``events.py``). The task, ``blaze.webhooks.deliver`` on the ``webhooks`` queue, runs
``deliver`` in a webhook worker (``blaze worker --engine webhooks``): the attempt claimed in
Redis with a deadline, one signed POST within the receiver's timeout, the attempt recorded on
the job, and on failure a retry scheduled. ``webhook_retries.py`` says when retries come and
sends again an attempt whose worker died; ``webhook_client.py`` sends, and ``addresses.py``
says which addresses a delivery may reach.

Receivers check signatures with any Standard Webhooks library, or ``signing.verify``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Mapping

import httpx
import redis
from pydantic import BaseModel, Field

# WebhookRefused and check_addresses are named here for api/push.py, which imports them from here.
from blaze_jobs.addresses import WebhookRefused as WebhookRefused
from blaze_jobs.addresses import check_addresses as check_addresses
from blaze_jobs.events import EVENT_FUNCTIONS_LUA, deliveries_key, delivery_order_key, event_order
from blaze_jobs.jobs import job_view
from blaze_jobs.settings import Settings
from blaze_jobs.signing import signed_headers, signing_secret
from blaze_jobs.webhook_client import http_client, time_limit
from blaze_jobs.webhook_retries import attempt_member, parse_retry_after, retries_key, retry_delay

log = logging.getLogger("blaze_jobs.webhooks")

#: How often a delivery looks whether the job's earlier events have had their first attempt,
#: and how long past the receiver's timeout it waits for them at most.
ORDER_POLL_S = 0.005
ORDER_GRACE_S = 5.0


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


# KEYS[1] a job's deliveries hash, KEYS[2] its order set, KEYS[3] the retries set. ARGV[1]
# the job id, ARGV[2] the delivery id, ARGV[3] the claim (JSON: token, start), ARGV[4] its
# deadline. Claims the delivery's next attempt for this worker: the attempt is then in the
# retries set, due at its deadline, and the delivery holds the claim. Nothing is claimed
# when the delivery ended or expired with its job, or when that attempt is in the retries set
# already (in flight on another worker, or scheduled for later): the message is then a
# duplicate, such as the one Redis hands back after its visibility timeout. Returns the
# verdict and, when claimed, the delivery, the job as it stood, the job's 410 flag and the
# first deliveries still waiting for a first attempt.
CLAIM_LUA = """
local found = redis.call('HMGET', KEYS[1], ARGV[2], ARGV[2] .. ':job', 'gone')
if not found[1] or not found[2] then return {'missing'} end
local delivery = cjson.decode(found[1])
if delivery['state'] ~= 'pending' and delivery['state'] ~= 'retrying' then return {delivery['state']} end
local attempts = delivery['attempts']
local number = (type(attempts) == 'table' and #attempts or 0) + 1
local member = ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. number
if redis.call('ZSCORE', KEYS[3], member) then return {'duplicate'} end
redis.call('ZADD', KEYS[3], ARGV[4], member)
redis.call('HSET', KEYS[1], ARGV[2] .. ':claim', ARGV[3])
return {'claimed', found[1], found[2], found[3], unpack(redis.call('ZRANGE', KEYS[2], 0, 9))}
"""

# KEYS[1] a job's deliveries hash, KEYS[2] its order set, KEYS[3] the retries set. ARGV[1]
# the delivery id, ARGV[2] its JSON, ARGV[3] "1" when the receiver answered 410 (the job's
# later deliveries are skipped), ARGV[4] a retry to schedule ("" for none) at time ARGV[5],
# ARGV[6] the claim the attempt was made under, ARGV[7] its member of the retries set.
# Writes only under the attempt's own claim: one past its deadline has been handed back and
# recorded as lost already, and a late write cannot bring back, without a TTL, what expired
# with its job.
SAVE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1] .. ':claim') ~= ARGV[6] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1] .. ':claim')
redis.call('ZREM', KEYS[3], ARGV[7])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'gone', '1') end
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4]) end
return 1
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
        self._claim_script = self.redis.register_script(CLAIM_LUA)
        self._save_script = self.redis.register_script(SAVE_LUA)
        #: Called after a retry is scheduled (the worker's ``RetryMover.wake``).
        self.retry_scheduled: Callable[[], None] = lambda: None

    @property
    def hold_s(self) -> float:
        """How long past its start an attempt stays claimed: the receiver's time and a margin."""
        return self.settings.webhook_timeout_s + self.settings.webhook_attempt_margin_s

    def close(self) -> None:
        self.http.close()

    def deliver(self, job_id: str, delivery_id: str) -> str:
        """Make one attempt at a delivery and record it; returns the delivery's new state
        (or ``missing``, or ``duplicate`` for a message whose attempt another one makes)."""
        prefix = self.settings.redis_prefix
        key, order, retries = deliveries_key(prefix, job_id), delivery_order_key(prefix, job_id), retries_key(self.settings)

        # 1. Claim the attempt, so it is known to be in flight until its deadline: should this
        #    worker die, a live one sends the delivery again then (``webhook_retries``).
        now = time.time()
        claim = json.dumps({"token": uuid.uuid4().hex, "at": _iso(now), "t": now})
        verdict, *found = self._claim_script(keys=[key, order, retries], args=[job_id, delivery_id, claim, repr(now + self.hold_s)])
        if verdict != b"claimed":
            if verdict == b"missing":
                log.info("delivery %s of job %s is gone (expired with its job)", delivery_id, job_id)
            return verdict.decode()
        raw, snapshot, gone, *waiting = found
        delivery = json.loads(raw)
        delivery.setdefault("attempts", [])
        number = len(delivery["attempts"]) + 1
        member = attempt_member(job_id, delivery_id, number)

        # 2. Events reach a receiver in order: a first attempt waits until the job's earlier
        #    events have had theirs. (A retry may land after later events; ``timestamp`` and
        #    ``data.status`` tell.) A receiver that answered 410 for the job gets nothing more.
        if delivery["state"] == "pending" and not delivery.get("redelivery_of") and _earlier(waiting, delivery):
            # Bounded, so a delivery lost with a dying worker cannot hold back the ones after it.
            until = float(delivery["at"]) + self.settings.webhook_timeout_s + ORDER_GRACE_S
            self.redis.zadd(retries, {member: max(now, until) + self.hold_s}, xx=True)
            while time.time() < until and _earlier(self.redis.zrange(order, 0, 9), delivery):
                time.sleep(ORDER_POLL_S)
            gone = self.redis.hexists(key, "gone")
        if gone:
            delivery["state"] = "skipped"
            self._save(job_id, delivery, claim=claim, member=member)
            return "skipped"

        # 3. One signed POST, within the receiver's time. The body is the same on every
        #    attempt; the timestamp is now.
        body = event_body(delivery, json.loads(snapshot), base_url=self.base_url)
        headers = signed_headers(self.secret, msg_id=delivery["webhook_id"], body=body)
        at, started = time.time(), time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            # Streamed and never read: a receiver's answer body is of no use and could be huge.
            with time_limit(self.settings.webhook_timeout_s):
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
                "at": _iso(at),
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
                delivery["next_attempt_at"] = _iso(due)
                retry = attempt_member(job_id, delivery_id, number + 1)
        saved = self._save(job_id, delivery, claim=claim, member=member, gone=status_code == 410, retry=retry, due=due)
        if retry and saved:
            self.retry_scheduled()
        log.info("webhook %s of job %s attempt %d: %s", delivery["type"], job_id, number, error or status_code)
        return delivery["state"]

    def _save(
        self, job_id: str, delivery: dict[str, Any], *, claim: str, member: str, gone: bool = False, retry: str = "", due: float = 0.0
    ) -> bool:
        prefix = self.settings.redis_prefix
        keys = [deliveries_key(prefix, job_id), delivery_order_key(prefix, job_id), retries_key(self.settings)]
        args = [delivery["id"], json.dumps(delivery, separators=(",", ":")), "1" if gone else "0", retry, repr(due), claim, member]
        if self._save_script(keys=keys, args=args):
            return True
        log.warning("attempt at delivery %s of job %s outlasted its deadline: not recorded (it was sent again)", delivery["id"], job_id)
        return False


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=timezone.utc).isoformat()


def _earlier(waiting: list[bytes], delivery: dict[str, Any]) -> bool:
    """Whether any of ``waiting`` (event ids) came before ``delivery``'s event."""
    mine = event_order(delivery["event_id"])
    return any(event_order(e.decode()) < mine for e in waiting)


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
