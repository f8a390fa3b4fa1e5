"""``Idempotency-Key`` on ``POST /v1/jobs`` (IETF draft-ietf-httpapi-idempotency-key-header):
a client that retries a create with the same key gets the job its first request made, never a
second one, for as long as that job is kept (at most ``BLAZE_IDEMPOTENCY_TTL_S``).

A key is scoped to the caller's tenant and stored as a hash. The first request claims it
(``SET NX``) with its job id and the body's fingerprint *before* it creates the job, so a
retry racing it finds the claim and waits for that one job. A claim whose create was refused
is released, so a later retry can succeed; one left behind by a create that never finished
(Redis went away mid-way) is taken over once it is older than any create can take.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from typing import Any

import orjson
from fastapi import HTTPException, Request
from pydantic import BaseModel

from blaze_jobs import scripts
from blaze_jobs.errors import JobNotFound
from blaze_jobs.records import text
from blaze_jobs.store import AsyncJobStore

from .problems import InputProblem
from .request_context import raw_header

HEADER = b"idempotency-key"
FIELD = "Idempotency-Key"
MAX_LENGTH = 255
#: What a key may be: visible ASCII at both ends (HTTP drops the spaces around a value).
KEY = re.compile(r"[!-~]([ -~]*[!-~])?")
log = logging.getLogger("blaze_jobs.api.idempotency")
#: How long a retry that raced the first request waits for that request's job to be stored:
#: a create takes milliseconds, so this is only reached when the first request is stuck.
RACE_WAIT_S = 5.0
#: How often the waiting retry looks for the job.
POLL_S = 0.02


def fingerprint(body: BaseModel) -> str:
    """The sha256 of the request's canonical JSON (parsed, defaults filled, keys sorted): two
    bodies that differ only in spacing, key order or spelled-out defaults are the same request."""
    fields = body.model_dump(mode="json")
    try:
        canonical = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer past 64 bits (an echo job takes any JSON): the same body always lands here
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def _key_from(header: bytes) -> str:
    """The header's key, taken whole (the draft's quoted sf-string or, as most clients send
    it, bare): visible ASCII, inner spaces allowed."""
    value = header.decode("latin-1")
    if len(value) > MAX_LENGTH or not KEY.fullmatch(value):
        raise InputProblem(FIELD, f"must be 1 to {MAX_LENGTH} visible ASCII characters (inner spaces allowed)")
    return value


async def claim(request: Request, *, tenant: str, body: BaseModel, job_id: str, key: str | None = None) -> dict[str, str] | None:
    """With an ``Idempotency-Key`` (the header, or ``key`` when an adapter names one): None
    when this request holds the key now and goes on to create ``job_id``; the original job's
    record when an earlier request with the same key and body made it. 422 naming
    ``Idempotency-Key`` for the same key with another body; 409 when the request holding the
    key is still not done after ``RACE_WAIT_S``. Without the header: None, with no Redis
    round trip."""
    header = key.encode("latin-1") if key is not None else raw_header(request, HEADER)
    if header is None:
        return None
    store: AsyncJobStore = request.app.state.store
    settings = store.settings
    key = store.keys.idempotency(tenant, hashlib.sha256(_key_from(header).encode()).hexdigest())
    printed = fingerprint(body)
    mine = f"{job_id} {printed}"
    # The original job can be answered only while it is kept.
    ttl_s = min(settings.idempotency_ttl_s, settings.job_ttl_s)
    # A create, once it holds the key, takes at most a pool wait and two commands.
    stale_after_ms = 1000 * (settings.redis_pool_wait_s + 2 * settings.redis_timeout_s + 1)
    deadline = time.monotonic() + RACE_WAIT_S
    while time.monotonic() < deadline:
        if await store.redis.set(key, mine, nx=True, ex=ttl_s):
            request.state.idempotency_claim = (key, mine)
            return None
        async with store.redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            held, left_ms = await pipe.execute()
        if held is None:  # released (its create was refused) or expired since: claim it
            continue
        held_id, _, held_print = text(held).partition(" ")
        if held_print != printed:
            raise InputProblem(FIELD, "this key was used for a different request; use a new key for a new request")
        try:
            return await store.get(held_id)
        except JobNotFound:
            pass
        if 1000 * ttl_s - left_ms > stale_after_ms:  # its create never finished: take over
            await _drop(store, key, text(held))
            continue
        await asyncio.sleep(POLL_S)
    raise HTTPException(
        409, "a request with this Idempotency-Key is still being processed; retry shortly", headers={"Retry-After": "1"}
    )


def held(request: Request) -> tuple[str, str] | None:
    """The claim this request holds (its key and value), for the create to be made only while
    it still holds it: a retry may take a claim over once it looks stale."""
    return getattr(request.state, "idempotency_claim", None)


async def release(request: Request) -> None:
    """Give up the key this request claimed, once its create was refused (nothing stored), so
    a retry with the key may create the job; a claim taken over meanwhile stays. Best effort:
    with Redis unreachable the claim goes stale and a later retry takes it over."""
    claimed = held(request)
    if claimed is None:
        return
    request.state.idempotency_claim = None
    try:
        await _drop(request.app.state.store, *claimed)
    except Exception as error:  # the create's own error is the answer
        log.warning("could not release Idempotency-Key claim %s (%s); a retry takes it over once stale", claimed[0], error)


async def _drop(store: AsyncJobStore, key: str, value: str) -> Any:
    # Compare-and-delete: never another request's claim.
    return await scripts.script(store.redis, "release")(keys=[key], args=[value])
