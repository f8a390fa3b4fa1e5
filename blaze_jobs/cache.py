"""The result cache: a deterministic request is computed once.

The key is a hash of the canonical request: the engine, the model and its revision, and every
input that changes the output. Only requests that fix their randomness (a seed) are cached.
L1 is a small dictionary in each process; L2 is Redis, with a TTL and a bound on entries
(the oldest go first). A cached output refers to artifacts by content address; the cache
renews their TTL on every hit, so a hit never points at an expired image, and makes the hit's
tenant one of their owners (``artifacts``), so it may read them.

Under ``BLAZE_CACHE_SCOPE=tenant`` (the default) the tenant is part of the key: a hit never
tells one tenant what another asked for, nor hands it another's image.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

from blaze_jobs.artifacts import artifact_names
from blaze_jobs.engines import SPECS, spec_of
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings

#: Revisions of the built-in models (their specs' ``BuiltinModel.revision``).
BUILTIN_REVISIONS = {builtin.id: builtin.revision for spec in SPECS for builtin in spec.builtin_models}


def cacheable(engine: str, input: dict[str, Any]) -> bool:
    """Only a request that fixes its randomness is cached (the engine's spec says when it does)."""
    return spec_of(engine).cacheable(input)


def cache_key(*, engine: str, model: str, input: dict[str, Any], tenant: str, settings: Settings) -> str:
    """The request's cache key; ``tenant`` is part of it unless ``BLAZE_CACHE_SCOPE=global``."""
    revision = settings.model_revisions.get(model) or BUILTIN_REVISIONS.get(model, "")
    ignored = spec_of(engine).not_output
    relevant = {k: v for k, v in input.items() if k not in ignored}
    scope = tenant if settings.cache_scope == "tenant" else None
    canonical = json.dumps([engine, model, revision, relevant, scope], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class LocalCache:
    """L1: the most recent outputs of this process, each until its TTL."""

    def __init__(self, *, entries: int, ttl_s: float) -> None:
        self.entries = entries
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[0] < time.monotonic():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self._items[key] = (time.monotonic() + self.ttl_s, value)
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)


class CacheKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.index = f"{prefix}cache-index"

    def entry(self, key: str) -> str:
        return f"{self.prefix}cache:{key}"


def queue_own(pipe: Any, output: Any, *, tenant: str, settings: Settings) -> None:
    """Queue on a pipeline the commands that make ``tenant`` an owner of every artifact the
    output points at, for as long as a job made now lives."""
    keys = Keys(settings.redis_prefix)
    for name in artifact_names(output):
        pipe.sadd(keys.artifact_owners(name), tenant)
        pipe.expire(keys.artifact_owners(name), settings.job_ttl_s)


def queue_renew(pipe: Any, output: Any, *, tenant: str, settings: Settings) -> None:
    """Queue on a pipeline the commands that keep an output's artifacts as long as a job that
    shows it now (a cache hit's new job), and make that job's tenant their owner."""
    keys = Keys(settings.redis_prefix)
    for name in artifact_names(output):
        pipe.expire(keys.artifact(name), settings.job_ttl_s)
    queue_own(pipe, output, tenant=tenant, settings=settings)


def queue_store(pipe: Any, keys: CacheKeys, key: str, output_json: str, *, settings: Settings) -> None:
    """Queue on a pipeline the commands that store an output in L2 and keep L2 bounded."""
    pipe.set(keys.entry(key), output_json, ex=settings.cache_ttl_s)
    pipe.zadd(keys.index, {key: time.time()})


def trim(client: Any, keys: CacheKeys, *, max_entries: int) -> None:
    """Drop the oldest L2 entries beyond the bound (blocking client)."""
    excess = client.zcard(keys.index) - max_entries
    if excess > 0:
        oldest = client.zpopmin(keys.index, excess)
        client.delete(*[keys.entry(k.decode() if isinstance(k, bytes) else k) for k, _ in oldest])


class InFlight:
    """Deterministic requests being computed in this process right now. The first job with a
    key computes; an identical job arriving meanwhile waits for that output instead, so both
    get the very same bytes (a batched CPU kernel may round one position differently)."""

    def __init__(self) -> None:
        self._leaders: dict[str, Future] = {}
        self._lock = threading.Lock()

    def follow(self, key: str, *, timeout: float) -> str | None:
        """The output of an identical job computing now, once it has it; None when there is
        none (the caller becomes the one computing) or it failed (the caller computes)."""
        with self._lock:
            leader = self._leaders.get(key)
            if leader is None:
                self._leaders[key] = Future()
                return None
        try:
            return leader.result(timeout=timeout)
        except Exception:
            return None

    def publish(self, key: str, output_json: str) -> None:
        with self._lock:
            leader = self._leaders.get(key)
        if leader is not None and not leader.done():
            leader.set_result(output_json)

    def done(self, key: str) -> None:
        """The computing job has ended, with or without an output: followers stop waiting."""
        with self._lock:
            leader = self._leaders.pop(key, None)
        if leader is not None and not leader.done():
            leader.set_exception(RuntimeError("the identical job ended without an output"))
