"""Request rates per API key. A key made with ``--rate 600/minute`` makes at most that many
requests in any moving window of a minute, counted in Redis by the ``limits`` library, so
every API process (``blaze api --workers N``, several hosts) shares one count. Past it: 429
with ``Retry-After`` and the IETF ``RateLimit-Policy`` / ``RateLimit`` headers
(draft-ietf-httpapi-ratelimit-headers)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import limits
import redis.exceptions
from fastapi import FastAPI, Request
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from blaze_jobs.api_keys import ApiKey
from blaze_jobs.keys import Keys
from blaze_jobs.redis_config import refusal

from .request_context import settings_of

#: The name the headers give a key's one policy.
POLICY = "default"

log = logging.getLogger("blaze_jobs.api.rate_limits")


class RateLimited(Exception):
    """The key made as many requests as its rate allows within the window (a 429)."""

    def __init__(self, key_id: str, *, rate: str, quota: int, window_s: int, retry_after_s: int) -> None:
        super().__init__(f"API key {key_id} is limited to {rate}; retry in {retry_after_s} s")
        self.key_id, self.rate, self.quota, self.window_s, self.retry_after_s = key_id, rate, quota, window_s, retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        """``Retry-After`` and the draft's ``RateLimit-Policy`` and ``RateLimit`` (none left)."""
        return {
            "Retry-After": str(self.retry_after_s),
            "RateLimit-Policy": f'"{POLICY}";q={self.quota};w={self.window_s}',
            "RateLimit": f'"{POLICY}";r=0;t={self.retry_after_s}',
        }


@lru_cache(maxsize=1024)
def parse(rate: str) -> limits.RateLimitItem:
    """``600/minute`` as a ``limits`` item, parsed once per distinct rate (a ``ValueError`` names
    a rate ``limits`` cannot read: keys are checked with this when they are made)."""
    return limits.parse(rate)


def limiter_of(app: FastAPI) -> MovingWindowRateLimiter:
    """The app's limiter, made on first use: it counts over ``app.state.redis``'s pool (its
    bound and its 503s apply), under ``Keys(prefix).rate_limits``; made again for a new pool
    (an app whose lifespan ran twice)."""
    pool = app.state.redis.connection_pool
    made: tuple[object, MovingWindowRateLimiter] | None = getattr(app.state, "rate_limiter", None)
    if made is None or made[0] is not pool:
        storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            key_prefix=Keys(settings_of(app).redis_prefix).rate_limits,
            connection_pool=pool,
        )
        made = app.state.rate_limiter = (pool, MovingWindowRateLimiter(storage))
    return made[1]


#: How long slots a process took from a key's shared window stay usable, in seconds (or a
#: tenth of the window, if shorter): a request is counted at most this long before it is made.
SLOT_LIFETIME_S = 1.0
#: A process takes at most this share of a key's limit in one round trip, so the limit holds
#: across API processes to within this share per process (a batch taken and not used).
SLOT_SHARE = 0.01


@dataclass
class _Slots:
    """Slots of one key's window this process has counted in Redis and not used yet."""

    left: int = 0
    until: float = 0.0
    #: How many the next round trip takes: doubled while they run out within their lifetime
    #: (the key is busy here), back to one when some went unused.
    batch: int = 1


#: By key id and rate; bounded, since keys come and go.
_SLOTS: dict[tuple[str, str], _Slots] = {}


async def check(request: Request, key: ApiKey) -> None:
    """Count this request against ``key``'s rate; ``RateLimited`` when it is past it.

    A key sending one request at a time costs a Redis round trip per request. A busy key's
    requests are counted in batches: the process takes several slots of the shared moving
    window in one round trip (at most ``SLOT_SHARE`` of the limit) and spends them over the
    next ``SLOT_LIFETIME_S``, so a key at hundreds of requests a second costs the create path
    almost nothing. Slots a process took and did not use count as used (at most one batch per
    process), and a request is counted up to ``SLOT_LIFETIME_S`` before it is made."""
    if key.rate is None:
        return
    slots = _SLOTS.get((key.id, key.rate))
    now = time.monotonic()
    if slots is not None and slots.left and now < slots.until:
        slots.left -= 1
        return
    item = parse(key.rate)
    if slots is None:
        if len(_SLOTS) >= 10_000:
            _SLOTS.clear()
        slots = _SLOTS[(key.id, key.rate)] = _Slots()
    cap = max(1, int(item.amount * SLOT_SHARE))
    batch = min(slots.batch * 2, cap) if now < slots.until else 1
    limiter = limiter_of(request.app)
    try:
        taken = batch if await limiter.hit(item, key.id, cost=batch) else 0
        if not taken and batch > 1:  # near the limit: the window may still hold a slot or a few
            taken = 1 if await limiter.hit(item, key.id) else 0
        if taken:
            slots.left, slots.batch = taken - 1, taken
            slots.until = time.monotonic() + min(SLOT_LIFETIME_S, item.get_expiry() / 10)
            return
        slots.left, slots.batch = 0, 1
    except redis.exceptions.ResponseError as error:
        # A Redis that refuses writes (at its memory limit, a replica) cannot count the request;
        # let it through rather than refuse reads too: every write it could make is refused
        # anyway. An unreachable Redis is a 503 as everywhere else.
        if refusal(error) is None:
            raise
        log.warning("request of key %s not counted against its rate: %s", key.id, refusal(error))
        return
    # Refused: a slot frees when the oldest request in the window leaves it.
    reset, remaining = await limiter.get_window_stats(item, key.id)
    # A slot that freed since the refusal (the window moved on) is free now: a second from now.
    retry_after_s = 1 if remaining > 0 else max(1, math.ceil(reset - time.time()))
    raise RateLimited(key.id, rate=key.rate, quota=item.amount, window_s=item.get_expiry(), retry_after_s=retry_after_s)
