"""The result cache: a deterministic request is computed once.

The key is a hash of the canonical request: the engine, the model and its revision, and every
input that changes the output. Only requests that fix their randomness (a seed) are cached.
L1 is a small dictionary in each process; L2 is Redis, with a TTL and a bound on entries
(the oldest go first). A cached output refers to artifacts by content address; the cache
renews their TTL on every hit, so a hit never points at an expired image.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

from blaze_jobs.artifacts import KEY_PATTERN, artifact_url
from blaze_jobs.engines import SPECS, spec_of
from blaze_jobs.settings import Settings

#: Where the API serves artifacts; a stored output's artifact URLs are these paths.
ARTIFACT_PATH = artifact_url("")
#: Revisions of the built-in models (their specs' ``BuiltinModel.revision``).
BUILTIN_REVISIONS = {builtin.id: builtin.revision for spec in SPECS for builtin in spec.builtin_models}


def cacheable(engine: str, input: dict[str, Any]) -> bool:
    """Only a request that fixes its randomness is cached (the engine's spec says when it does)."""
    return spec_of(engine).cacheable(input)


def cache_key(*, engine: str, model: str, input: dict[str, Any], settings: Settings) -> str:
    revision = settings.model_revisions.get(model) or BUILTIN_REVISIONS.get(model, "")
    ignored = spec_of(engine).not_output
    relevant = {k: v for k, v in input.items() if k not in ignored}
    canonical = json.dumps([engine, model, revision, relevant], sort_keys=True, separators=(",", ":"))
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


def artifact_keys(output: Any, prefix: str) -> list[str]:
    """The Redis keys of every artifact an output refers to, wherever it sits (images, or
    any other file an engine makes): each is a ``{"url": "/v1/artifacts/<key>", …}``."""
    keys: list[str] = []
    pending = [output]
    while pending:  # a stack, not recursion: an output may nest deeper than the recursion limit
        value = pending.pop()
        if isinstance(value, dict):
            url = value.get("url")
            if isinstance(url, str) and url.startswith(ARTIFACT_PATH) and KEY_PATTERN.match(url[len(ARTIFACT_PATH) :]):
                keys.append(f"{prefix}artifact:{url[len(ARTIFACT_PATH) :]}")
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return list(dict.fromkeys(keys))


def queue_renew(pipe: Any, output: Any, *, settings: Settings) -> None:
    """Queue on a pipeline the commands that keep an output's artifacts as long as a job that
    shows it now (a cache hit's new job)."""
    for key in artifact_keys(output, settings.redis_prefix):
        pipe.expire(key, settings.job_ttl_s)


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
