"""Webhooks: job events POSTed to the URL a job names, signed per the Standard Webhooks spec.

A delivery is recorded, and its Celery task queued, by the Lua step that makes the event
(``events.py``, ``deliveries.py``). The task, ``blaze.webhooks.deliver`` on the ``webhooks`` queue, runs
``deliver`` in a webhook worker (``blaze worker --engine webhooks``): the attempt claimed in
Redis with a deadline, one signed POST within the receiver's timeout, the attempt recorded on
the job, and on failure a retry scheduled. ``webhook_retries.py`` says when retries come and
sends again an attempt whose worker died; ``webhook_client.py`` sends, and ``addresses.py``
says which addresses a delivery may reach.

Receivers check signatures with any Standard Webhooks library, or ``signing.verify``.

With metrics on (the webhook worker's ``--metrics-port``), each attempt counts by event and
outcome: ``delivered``, ``retry`` (another attempt is scheduled), ``gone`` (410) or
``refused`` (it failed and the schedule is spent: the delivery is given up, and
``blaze_webhook_retries_exhausted_total`` counts it too); a delivered one records its latency
from its event.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import httpx
import redis

from blaze_jobs import logs, metrics, scripts
from blaze_jobs.artifacts import url_signer
from blaze_jobs.deliveries import event_body
from blaze_jobs.events import event_order
from blaze_jobs.keys import Keys
from blaze_jobs.records import tenant_of, text
from blaze_jobs.settings import Settings
from blaze_jobs.signing import signed_headers, tenant_secrets
from blaze_jobs.webhook_client import http_client, time_limit
from blaze_jobs.webhook_retries import attempt_member, parse_retry_after, retry_delay

log = logging.getLogger("blaze_jobs.webhooks")

#: How long a webhook worker signs with a tenant's secrets before it reads them again, in
#: seconds: a rotation reaches every delivery within this, and a worker sending a tenant's
#: events costs one read of its secrets per this span, not one per delivery.
SECRETS_CACHE_S = 2.0


class Deliverer:
    """What a webhook worker holds: Redis, the HTTP client and the tenants' signing secrets,
    each read a few seconds at most ago (``SECRETS_CACHE_S``)."""

    def __init__(self, settings: Settings, *, client: redis.Redis | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.name = name  # the webhook worker's, on its log lines
        self.redis = client or redis.Redis.from_url(
            settings.redis_url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=10, retry_on_timeout=True
        )
        self.http = http_client(settings)
        #: Tenant -> (monotonic time the entry stops being used, the secrets it signs with).
        self._secrets: dict[str, tuple[float, list[str]]] = {}
        self.base_url = (settings.public_url or settings.api_url).rstrip("/")
        self.keys = Keys(settings.redis_prefix)
        self._claim_script = scripts.script(self.redis, "claim")
        self._save_script = scripts.script(self.redis, "save")
        #: Called after a retry is scheduled (the worker's ``RetryMover.wake``).
        self.retry_scheduled: Callable[[], None] = lambda: None

    @property
    def hold_s(self) -> float:
        """How long past its start an attempt stays claimed: the receiver's time and a margin."""
        return self.settings.webhook_timeout_s + self.settings.webhook_attempt_margin_s

    def close(self) -> None:
        self.http.close()

    def secrets(self, tenant: str) -> list[str]:
        """The secrets ``tenant``'s deliveries are signed with now: its current one, and its
        previous one during a rotation's grace period (read again once that ends)."""
        now = time.monotonic()
        cached = self._secrets.get(tenant)
        if cached is not None and now < cached[0]:
            return cached[1]
        found = tenant_secrets(self.redis, self.settings, tenant)
        until = now + SECRETS_CACHE_S
        if found.previous_until is not None:  # not a moment past the grace period
            until = min(until, now + found.previous_until - time.time())
        self._secrets[tenant] = (until, found.signing)
        return found.signing

    def deliver(self, job_id: str, delivery_id: str) -> str:
        """Make one attempt at a delivery and record it; returns the delivery's new state
        (or ``missing``, or ``duplicate`` for a message whose attempt another one makes)."""
        with logs.job_context(job=job_id, engine="webhooks", worker=self.name):
            return self._deliver(job_id, delivery_id)

    def _deliver(self, job_id: str, delivery_id: str) -> str:
        key, order, retries = self.keys.deliveries(job_id), self.keys.webhook_order(job_id), self.keys.webhook_retries

        # 1. Claim the attempt, so it is known to be in flight until its deadline: should this
        #    worker die, a live one sends the delivery again then (``webhook_retries``).
        now = time.time()
        claim = json.dumps({"token": uuid.uuid4().hex, "at": _iso(now), "t": now})
        verdict, *found = self._claim_script(
            keys=[key, order, retries], args=[job_id, delivery_id, claim, repr(now + self.hold_s)]
        )
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
            until = float(delivery["at"]) + self.settings.webhook_timeout_s + self.settings.webhook_order_grace_s
            self.redis.zadd(retries, {member: max(now, until) + self.hold_s}, xx=True)
            while time.time() < until and _earlier(self.redis.zrange(order, 0, 9), delivery):
                time.sleep(self.settings.webhook_order_poll_s)
            gone = self.redis.hexists(key, "gone")
        if gone:
            delivery["state"] = "skipped"
            self._save(job_id, delivery, claim=claim, member=member)
            return "skipped"

        # 3. One signed POST, within the receiver's time. The body is the same on every
        #    attempt; the timestamp is now. The job's tenant's secrets sign it: the job as it
        #    stood names its tenant.
        job = json.loads(snapshot)
        body = event_body(delivery, job, base_url=self.base_url, signer=url_signer(self.redis, self.settings))
        secrets = self.secrets(tenant_of(job.get("tenant"), self.settings))
        headers = signed_headers(secrets, msg_id=delivery["webhook_id"], body=body)
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
            delay = retry_delay(
                number,
                self.settings.webhook_retry_schedule,
                retry_after=retry_after,
                jitter=self.settings.webhook_retry_jitter,
                retry_after_max_s=self.settings.webhook_retry_after_max_s,
            )
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
        # An attempt not saved outlasted its claim: it is sent again, and counted then.
        if saved and metrics.enabled():
            _record(delivery)
        log.info("webhook %s of job %s attempt %d: %s", delivery["type"], job_id, number, error or status_code)
        return delivery["state"]

    def _save(
        self,
        job_id: str,
        delivery: dict[str, Any],
        *,
        claim: str,
        member: str,
        gone: bool = False,
        retry: str = "",
        due: float = 0.0,
    ) -> bool:
        keys = [self.keys.deliveries(job_id), self.keys.webhook_order(job_id), self.keys.webhook_retries]
        args = [
            delivery["id"],
            json.dumps(delivery, separators=(",", ":")),
            "1" if gone else "0",
            retry,
            repr(due),
            claim,
            member,
        ]
        if self._save_script(keys=keys, args=args):
            return True
        log.warning(
            "attempt at delivery %s of job %s outlasted its deadline: not recorded (it was sent again)", delivery["id"], job_id
        )
        return False


#: A delivery's state after an attempt, as the attempt's outcome in blaze_webhook_deliveries_total.
OUTCOMES = {"succeeded": "delivered", "retrying": "retry", "gone": "gone", "failed": "refused"}


def _record(delivery: dict[str, Any]) -> None:
    event, state = delivery["type"], delivery["state"]
    metrics.WEBHOOK_DELIVERIES.labels(event, OUTCOMES[state]).inc()
    if state == "succeeded":
        metrics.WEBHOOK_LATENCY.labels(event).observe(time.time() - float(delivery["at"]))
    elif state == "failed":
        metrics.WEBHOOK_EXHAUSTED.labels(event).inc()


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=timezone.utc).isoformat()


def _earlier(waiting: Iterable[Any], delivery: dict[str, Any]) -> bool:
    """Whether any of ``waiting`` (event ids) came before ``delivery``'s event."""
    mine = event_order(delivery["event_id"])
    return any(event_order(text(e)) < mine for e in waiting)


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
