"""Who a request is: ``Authorization: Bearer <API key>`` on every ``/v1`` route, as FastAPI
dependencies the routes share. A key names its tenant; a job of another tenant is a 404.

Keys live in Redis (``blaze_jobs.api_keys``); each API process keeps what it looked up for
``BLAZE_KEY_CACHE_S``, so a request's key costs a dictionary look-up, not a round trip, and a
revoked key stops working within that bound everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from starlette.exceptions import HTTPException

from blaze_jobs import api_keys
from blaze_jobs.api_keys import ADMIN_TOKEN_ID, AUTH_OFF_ID, ApiKey, bootstrap_key
from blaze_jobs.settings import Settings

from . import rate_limits
from .request_context import raw_header, settings_of

#: Keys one API process remembers: far more than a deployment has in use at once.
CACHE_MAX_KEYS = 10_000
#: Unknown secrets it remembers, apart, so a client sending random ones cannot push the
#: real keys out (it only refills this smaller table).
CACHE_MAX_UNKNOWN = 1_000


class Unauthorized(HTTPException):
    """No usable key: a 401 problem with ``WWW-Authenticate: Bearer``."""

    def __init__(self, detail: str) -> None:
        super().__init__(401, detail, headers={"WWW-Authenticate": "Bearer"})


class KeyCache:
    """What this process looked up, by key hash: (when it goes stale, the key or None)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.known: dict[str, tuple[float, ApiKey | None]] = {}
        self.unknown: dict[str, tuple[float, ApiKey | None]] = {}

    def get(self, hashed: str, now: float) -> tuple[bool, ApiKey | None]:
        """(found, key): found is False when the look-up must go to Redis."""
        entry = self.known.get(hashed) or self.unknown.get(hashed)
        if entry is not None and entry[0] > now:
            return True, entry[1]
        return False, None

    def put(self, hashed: str, key: ApiKey | None, now: float) -> None:
        table, other, bound = (
            (self.known, self.unknown, CACHE_MAX_KEYS) if key is not None else (self.unknown, self.known, CACHE_MAX_UNKNOWN)
        )
        if len(table) >= bound:
            _trim(table, now)
        table[hashed] = (now + self.ttl_s, key)
        other.pop(hashed, None)

    def forget(self, key_id: str) -> None:
        """Drop a key this process changed or revoked, so that it sees the change at once."""
        for hashed in [h for h, (_, key) in self.known.items() if key is not None and key.id == key_id]:
            del self.known[hashed]


def _trim(table: dict[str, tuple[float, ApiKey | None]], now: float) -> None:
    """Drop stale entries; if that frees nothing, the older half (dicts keep insertion order)."""
    size = len(table)
    for hashed in [h for h, (expires, _) in table.items() if expires <= now]:
        del table[hashed]
    if len(table) == size:
        for hashed in list(table)[: size // 2 + 1]:
            del table[hashed]


def key_cache(app: FastAPI) -> KeyCache:
    """The app's key cache, made on first use."""
    cache: KeyCache | None = getattr(app.state, "key_cache", None)
    if cache is None:
        cache = app.state.key_cache = KeyCache(settings_of(app).key_cache_s)
    return cache


async def authenticated(request: Request) -> ApiKey:
    """The key the request carries; a 401 when it has none, or one that is unknown or revoked."""
    settings = settings_of(request.app)
    if settings.auth == "off":
        return bootstrap_key(settings, AUTH_OFF_ID)
    header = raw_header(request, b"authorization")
    scheme, _, token = (header or b"").decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("an API key is required: send Authorization: Bearer <key>")
    if settings.admin_token and hmac.compare_digest(token.encode(), settings.admin_token.encode()):
        return bootstrap_key(settings, ADMIN_TOKEN_ID)
    hashed = hashlib.sha256(token.encode()).hexdigest()  # api_keys.key_hash, without a call
    cache = key_cache(request.app)
    now = time.monotonic()
    found, key = cache.get(hashed, now)
    if not found:
        key = await api_keys.lookup(request.app.state.redis, settings, token)
        cache.put(hashed, key, now)
    if key is None:
        raise Unauthorized("unknown or revoked API key")
    await rate_limits.check(request, key)
    return key


async def admin(key: Annotated[ApiKey, Depends(authenticated)]) -> ApiKey:
    """An admin key; a 403 for any other."""
    if not key.admin:
        raise HTTPException(403, "this needs an admin key")
    return key


def warn_if_off(settings: Settings, log: logging.Logger) -> None:
    """Say loudly, at start, that an API without auth takes every caller for an admin."""
    if settings.auth == "off":
        log.warning(
            "BLAZE_AUTH=off: NO API KEY IS CHECKED. Every caller that reaches this API is an admin "
            "of tenant %r: it can read and cancel every job and make keys. Use this only for a "
            "private single-user deployment.",
            settings.default_tenant,
        )


#: What a route declares to know its caller: ``key: Caller``.
Caller = Annotated[ApiKey, Depends(authenticated)]
Admin = Annotated[ApiKey, Depends(admin)]
