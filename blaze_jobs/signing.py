"""Standard Webhooks signing: each tenant's ``whsec_`` secret and its rotation, the signatures
a delivery carries, and their verification by a receiver (``BlazeClient.verify_webhook``).
Signatures are made and checked by ``standardwebhooks``, the specification's reference library.

A rotation keeps the replaced secret for ``BLAZE_WEBHOOK_SECRET_GRACE_S`` (or a shorter grace
the rotation asks for; none after a leak); meanwhile a delivery carries a signature by each
(``v1,<new> v1,<old>``, as the specification allows), so a receiver holding either secret
verifies it and none loses an event while it switches."""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis
import standardwebhooks

from blaze_jobs import scripts
from blaze_jobs.errors import BlazeError
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings

SECRET_PREFIX = "whsec_"


class WebhookVerificationError(BlazeError, standardwebhooks.WebhookVerificationError):
    """A webhook's signature headers do not match its body (or are missing or stale)."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class TenantSecrets:
    """A tenant's signing secrets: the current one and, in a rotation's grace period, the one
    it replaced, with when that one stops signing."""

    secret: str
    previous: str | None = None
    #: Unix seconds when ``previous`` expires.
    previous_until: float | None = None

    @property
    def signing(self) -> list[str]:
        """The secrets a delivery is signed with now: the current one first."""
        return [self.secret] if self.previous is None else [self.secret, self.previous]


def fixed_secret(settings: Settings, tenant: str) -> str | None:
    """``BLAZE_WEBHOOK_SECRET``, for the default tenant only (it predates tenants); None for
    every other tenant, or when it is not set: their secrets live in Redis."""
    return (settings.webhook_secret or None) if tenant == settings.default_tenant else None


def _keys(settings: Settings, tenant: str) -> list[str]:
    keys = Keys(settings.redis_prefix)
    return [keys.tenant_webhook_secret(tenant), keys.tenant_previous_webhook_secret(tenant), keys.webhook_secret]


def _secrets(reply: list[Any], *, now: float) -> TenantSecrets:
    secret, previous, ttl_ms = reply
    if not previous or int(ttl_ms) <= 0:
        return TenantSecrets(secret.decode())
    return TenantSecrets(secret.decode(), previous.decode(), now + int(ttl_ms) / 1000)


def tenant_secrets(client: redis.Redis, settings: Settings, tenant: str) -> TenantSecrets:
    """The secrets ``tenant``'s deliveries are signed with (one made on first use), in one
    round trip. ``previous_until`` counts from before the call, so it is never late."""
    if fixed := fixed_secret(settings, tenant):
        return TenantSecrets(fixed)
    now = time.time()
    default = "1" if tenant == settings.default_tenant else "0"
    reply = scripts.script(client, "webhook_secrets")(keys=_keys(settings, tenant), args=[new_secret(), default])
    return _secrets(reply, now=now)


async def tenant_secrets_async(client: Any, settings: Settings, tenant: str) -> TenantSecrets:
    """``tenant_secrets`` on an asyncio client (the API's)."""
    if fixed := fixed_secret(settings, tenant):
        return TenantSecrets(fixed)
    now = time.time()
    default = "1" if tenant == settings.default_tenant else "0"
    reply = await scripts.script(client, "webhook_secrets")(keys=_keys(settings, tenant), args=[new_secret(), default])
    return _secrets(reply, now=now)


async def rotate_async(client: Any, settings: Settings, tenant: str, *, grace_s: float | None = None) -> TenantSecrets:
    """Give ``tenant`` a new secret; the one it replaces keeps signing beside it for ``grace_s``
    seconds (``webhook_secret_grace_s`` when None; 0 drops it at once, as after a leak: a
    leaked secret must not stay good for forgeries). Not for a secret ``BLAZE_WEBHOOK_SECRET``
    sets (``fixed_secret``): that one changes with the setting."""
    now = time.time()
    default = "1" if tenant == settings.default_tenant else "0"
    grace = settings.webhook_secret_grace_s if grace_s is None else grace_s
    grace_ms = str(int(max(0.0, grace) * 1000))
    reply = await scripts.script(client, "rotate_webhook_secret")(
        keys=_keys(settings, tenant), args=[new_secret(), grace_ms, default]
    )
    return _secrets(reply, now=now)


#: A receiver's client reads its tenant's secrets again, on a webhook that no secret it holds
#: verifies, at most this often (seconds): a rotation whose grace period ended is picked up,
#: and a stream of forged webhooks costs the API one request per this span, not one each.
REFETCH_S = 30.0


class HeldSecrets:
    """The secrets a receiver's client holds, as ``GET /v1/webhooks/secret`` answered them (the
    current one, and the previous one in a rotation's grace period), and whether to ask again."""

    def __init__(self) -> None:
        self.secrets: list[str] = []
        self._fetched_at = float("-inf")

    def hold(self, answer: Mapping[str, Any]) -> list[str]:
        self.secrets = [answer["secret"], *([answer["previous"]] if answer.get("previous") else [])]
        self._fetched_at = time.monotonic()
        return self.secrets

    @property
    def stale(self) -> bool:
        """Whether a failed verification may ask the API again (the tenant may have rotated)."""
        return time.monotonic() - self._fetched_at >= REFETCH_S


def sign(secret: str | Sequence[str], *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``
    by each secret, space-separated (several during a rotation's grace period)."""
    at = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    each = [secret] if isinstance(secret, str) else secret
    return " ".join(standardwebhooks.Webhook(one).sign(msg_id, at, body.decode()) for one in each)


def signed_headers(secret: str | Sequence[str], *, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of a delivery signed by ``secret`` (or by each of several)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id=msg_id, timestamp=timestamp, body=body),
    }


def verify(secret: str | Sequence[str], headers: Mapping[str, str], body: bytes | str) -> dict[str, Any]:
    """The event of a webhook request whose signature holds, by ``secret`` (or by any of several:
    a tenant's current and previous ones); raises ``WebhookVerificationError`` otherwise
    (missing headers, no matching signature, a timestamp over five minutes off)."""
    each = [secret] if isinstance(secret, str) else list(secret)
    refusal = WebhookVerificationError("no secret to verify with")
    for one in each:
        try:
            text = body.decode() if isinstance(body, bytes) else body
            return standardwebhooks.Webhook(one).verify(text, dict(headers.items()))
        except standardwebhooks.WebhookVerificationError as refused:
            reason = str(refused)
            if reason.startswith("Message timestamp"):  # "too old" or "too new": the spec's tolerance
                reason = "webhook-timestamp is more than five minutes off"
            refusal = WebhookVerificationError(reason)
        except (UnicodeDecodeError, ValueError, binascii.Error) as malformed:
            # A signature without "v1," or not base64, a body that is no UTF-8 or no JSON: the
            # library lets these through as they are.
            refusal = WebhookVerificationError(f"malformed webhook: {malformed}")
    raise refusal from None
