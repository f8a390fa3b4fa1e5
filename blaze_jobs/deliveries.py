"""Webhook deliveries as recorded on a job: the records, their API models, and redelivery.

The Lua step that makes an event records a delivery when the job's webhook wants it
(``blaze_event`` in ``lua/events.lua``): a field ``<event id>`` of the job's deliveries hash
(``keys.Keys.deliveries``) holds the delivery as JSON, ``<event id>:job`` the job as it stood
(the body every attempt sends), and the job's webhook order set (``keys.Keys.webhook_order``)
the deliveries still waiting for a first attempt. The deliverer (``webhooks.py``) claims and
records attempts; ``GET /v1/jobs/{id}/deliveries`` reads them (``delivery_list``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from blaze_jobs import scripts
from blaze_jobs.artifacts import UrlSigner
from blaze_jobs.broker import webhook_task_template
from blaze_jobs.jobs import job_view
from blaze_jobs.keys import WEBHOOK_QUEUE, Keys
from blaze_jobs.predictions import SURFACE, prediction_view


def deliveries_key(prefix: str, job_id: str) -> str:
    return Keys(prefix).deliveries(job_id)


def delivery_order_key(prefix: str, job_id: str) -> str:
    return Keys(prefix).webhook_order(job_id)


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


def event_body(delivery: dict[str, Any], record: dict[str, str], *, base_url: str, signer: UrlSigner) -> bytes:
    """The POSTed JSON; the same bytes on every attempt and redelivery of an event (its
    artifact URLs are signed until the job's expiry, which the snapshot's creation fixes)."""
    if record.get("surface") == SURFACE:  # a Replicate prediction's webhook gets the prediction
        prediction = prediction_view(record, base_url=base_url, signer=signer)
        return json.dumps(prediction, separators=(",", ":")).encode()
    timestamp = datetime.fromtimestamp(float(delivery["at"]), tz=timezone.utc).isoformat()
    payload = {"type": delivery["type"], "timestamp": timestamp, "data": job_view(record, base_url=base_url, signer=signer)}
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


async def redeliver(client: Any, keys: Keys, job_id: str, delivery_id: str) -> bytes | None:
    """Record a new delivery of the same event as ``delivery_id`` (same webhook-id and body),
    lift a receiver's earlier 410 and queue it (``lua/redeliver.lua``); its JSON, or None when
    the job has no such delivery. ``client`` is a redis.asyncio client."""
    script_keys = [keys.deliveries(job_id), keys.queue(WEBHOOK_QUEUE)]
    args = [job_id, delivery_id, webhook_task_template()]
    reply: bytes | None = await scripts.script(client, "redeliver")(keys=script_keys, args=args)
    return reply
