"""Standard Webhooks signing: the deployment's ``whsec_`` secret, the signature a delivery
carries, and its verification by a receiver (``BlazeClient.verify_webhook``). Signatures
are made and checked by ``standardwebhooks``, the specification's reference library."""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, cast

import redis
import standardwebhooks

from blaze_jobs.errors import BlazeError
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings

SECRET_PREFIX = "whsec_"


class WebhookVerificationError(BlazeError, standardwebhooks.WebhookVerificationError):
    """A webhook's signature headers do not match its body (or are missing or stale)."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key_name(settings: Settings) -> str:
    return Keys(settings.redis_prefix).webhook_secret


def signing_secret(client: redis.Redis, settings: Settings) -> str:
    """``BLAZE_WEBHOOK_SECRET``, or the deployment's generated secret (made on first use)."""
    if settings.webhook_secret:
        return settings.webhook_secret
    client.set(secret_key_name(settings), new_secret(), nx=True)
    return cast(bytes, client.get(secret_key_name(settings))).decode()  # set just above, if it was not


async def signing_secret_async(client: Any, settings: Settings) -> str:
    if settings.webhook_secret:
        return settings.webhook_secret
    await client.set(secret_key_name(settings), new_secret(), nx=True)
    return (await client.get(secret_key_name(settings))).decode()


def sign(secret: str, *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``."""
    return standardwebhooks.Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=timezone.utc), body.decode())


def signed_headers(secret: str, *, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id=msg_id, timestamp=timestamp, body=body),
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes | str) -> dict[str, Any]:
    """The event of a webhook request whose signature holds; raises ``WebhookVerificationError``
    otherwise (missing headers, no matching signature, a timestamp over five minutes off)."""
    try:
        text = body.decode() if isinstance(body, bytes) else body
        return standardwebhooks.Webhook(secret).verify(text, dict(headers.items()))
    except standardwebhooks.WebhookVerificationError as refused:
        reason = str(refused)
        if reason.startswith("Message timestamp"):  # "too old" or "too new": the spec's tolerance
            reason = "webhook-timestamp is more than five minutes off"
        raise WebhookVerificationError(reason) from None
    except (UnicodeDecodeError, ValueError, binascii.Error) as malformed:
        # A signature without "v1," or not base64, a body that is no UTF-8 or no JSON: the
        # library lets these through as they are.
        raise WebhookVerificationError(f"malformed webhook: {malformed}") from None
