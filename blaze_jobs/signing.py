"""Standard Webhooks signing: the deployment's ``whsec_`` secret, the signature a delivery
carries, and its verification by a receiver (``BlazeClient.verify_webhook``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any, Mapping

import redis

from blaze_jobs.errors import BlazeError
from blaze_jobs.settings import Settings

SECRET_PREFIX = "whsec_"
#: A receiver rejects a signature older or newer than this (the spec's five minutes).
TIMESTAMP_TOLERANCE_S = 300


class WebhookVerificationError(BlazeError):
    """A webhook's signature headers do not match its body (or are missing or stale)."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _secret_key(secret: str) -> bytes:
    raw = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    return base64.b64decode(raw + "==")


def secret_key_name(settings: Settings) -> str:
    return settings.key("webhook-secret")


def signing_secret(client: redis.Redis, settings: Settings) -> str:
    """``BLAZE_WEBHOOK_SECRET``, or the deployment's generated secret (made on first use)."""
    if settings.webhook_secret:
        return settings.webhook_secret
    client.set(secret_key_name(settings), new_secret(), nx=True)
    return client.get(secret_key_name(settings)).decode()


async def signing_secret_async(client: Any, settings: Settings) -> str:
    if settings.webhook_secret:
        return settings.webhook_secret
    await client.set(secret_key_name(settings), new_secret(), nx=True)
    return (await client.get(secret_key_name(settings))).decode()


def sign(secret: str, *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``."""
    digest = hmac.new(_secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, *, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id=msg_id, timestamp=timestamp, body=body),
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes | str, *, now: float | None = None) -> dict[str, Any]:
    """The event of a webhook request whose signature holds; raises ``WebhookVerificationError``
    otherwise (missing headers, no matching signature, a timestamp over five minutes off)."""
    body = body.encode() if isinstance(body, str) else body
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = lower.get("webhook-id"), lower.get("webhook-timestamp"), lower.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"bad webhook-timestamp {stamp!r}") from None
    if abs((time.time() if now is None else now) - timestamp) > TIMESTAMP_TOLERANCE_S:
        raise WebhookVerificationError("webhook-timestamp is more than five minutes off")
    expected = sign(secret, msg_id=msg_id, timestamp=timestamp, body=body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures.split()):
        raise WebhookVerificationError("no matching signature")
    return json.loads(body)
