"""The ``openai`` client's own retries, answered with the job the first attempt made.

The client retries a POST after a timeout, a lost connection, a 429 or a 5xx, with no
idempotency key of its own, but it numbers its attempts (``x-stainless-retry-count``). So an
attempt that carries the header remembers, for a short while, which job its request made,
under the fingerprint of (tenant, key id, route, canonical body); a later attempt (count 1 or
more) whose fingerprint names a job answers that job instead of making a second. Two first
attempts with the same body are two jobs: asking the same thing twice is a user's choice.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import Request

from blaze_jobs.api_keys import ApiKey
from blaze_jobs.keys import Keys
from blaze_jobs.records import text
from blaze_jobs.settings import Settings

from .request_context import raw_header, settings_of

HEADER = b"x-stainless-retry-count"
#: How long the memory outlasts the longest answer (``openai_wait_s``): the client waits at
#: most 8 s between attempts, or a ``Retry-After`` it honours up to 60 s; two minutes cover both.
GRACE_S = 120


def attempt(request: Request) -> int | None:
    """The client's attempt number (0 the first), None when it does not number them."""
    value = raw_header(request, HEADER)
    if value is None:
        return None
    try:
        return max(0, int(value.decode("latin-1").strip()))
    except ValueError:
        return None


def fingerprint(caller: ApiKey, route: str, body: dict[str, Any]) -> str:
    """The sha256 of who sent which body to which route; bodies equal as JSON are equal."""
    canonical = json.dumps([caller.tenant, caller.id, route, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def ttl_s(settings: Settings) -> int:
    return int(settings.openai_wait_s) + GRACE_S


async def earlier_job(request: Request, caller: ApiKey, route: str, body: dict[str, Any]) -> str | None:
    """For a retry (attempt 1 or later), the id of the job an earlier attempt of the same
    request made; None for a first attempt, or when none is remembered."""
    number = attempt(request)
    if not number:
        return None
    settings = settings_of(request.app)
    key = Keys(settings.redis_prefix).openai_retry(caller.tenant, fingerprint(caller, route, body))
    found = await request.app.state.store.redis.get(key)
    return text(found) if found else None


async def remember(request: Request, caller: ApiKey, route: str, body: dict[str, Any], job_id: str) -> None:
    """Remember that this attempt of the request made ``job_id``, when the client numbers its
    attempts (a client that does not never sends a retry this could answer)."""
    if attempt(request) is None:
        return
    settings = settings_of(request.app)
    key = Keys(settings.redis_prefix).openai_retry(caller.tenant, fingerprint(caller, route, body))
    await request.app.state.store.redis.set(key, job_id, ex=ttl_s(settings))
