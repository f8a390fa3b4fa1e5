"""What Blaze Jobs needs of its Redis, checked by the API and the workers at start and by
``/readyz``; ``docs/reliability.md`` tells operators what to set.

Every accepted job lives only in Redis, so Redis must

* never evict: ``maxmemory-policy noeviction``. Any other policy lets Redis delete job
  records, queued messages and indexes to make room, silently, while the API goes on
  answering 202; the ``volatile-*`` policies too, since every Blaze key has a time to live.
  An evicting Redis is refused.
* persist: ``appendonly yes``. Without it a restart loses every job it held; with snapshots
  only, a crash loses the jobs accepted since the last one. Warned about, not refused: a
  throwaway Redis (tests, the demo) needs none.

At its memory limit a ``noeviction`` Redis refuses writes: the API answers 503 and
``/readyz`` says not ready until there is room; workers wait for room.

Managed Redis services often refuse ``CONFIG``: the policy and the append-only flag come
from ``INFO``, which they allow, and only the snapshot schedule needs ``CONFIG GET``; what
cannot be read is warned about, never refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from redis.backoff import AbstractBackoff
from redis.retry import Retry

from blaze_jobs.errors import RedisMisconfigured
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings

NOEVICTION = "noeviction"
#: The readiness probe's key lives this long (ms): long enough to be harmless, short enough
#: to leave nothing behind.
PROBE_TTL_MS = 10_000

# Redis's error codes for a write refused by design, and what each means to an operator.
_REFUSALS = {
    "OOM": "Redis is at its memory limit (maxmemory) and refuses writes until memory frees",
    "READONLY": "Redis is a read-only replica and refuses writes",
    "MISCONF": "Redis refuses writes because it cannot save its snapshots (MISCONF; see its log)",
}


@dataclass(frozen=True)
class RedisCheck:
    """What one look at Redis found: ``problem`` must stop Blaze Jobs, ``refusing`` says why
    Redis takes no writes now, ``warnings`` say what is unsafe but allowed."""

    problem: str | None = None
    refusing: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return self.problem is None and self.refusing is None


def refusal(error: BaseException) -> str | None:
    """Why Redis refused a write, when ``error`` is such a refusal (memory limit, replica,
    failed snapshots); None for any other error."""
    if isinstance(error, redis.exceptions.OutOfMemoryError):
        return _REFUSALS["OOM"]
    if isinstance(error, redis.exceptions.ReadOnlyError):
        return _REFUSALS["READONLY"]
    if not isinstance(error, redis.exceptions.ResponseError):
        return None
    # Redis before 7 wraps the refusal of a script's write: "Error running script ... -OOM ...".
    text = str(error)
    return next((why for code, why in _REFUSALS.items() if text.startswith(f"{code} ") or f"-{code} " in text), None)


class WaitingRetry(Retry):
    """redis-py's retry policy, which also waits out a Redis that refuses writes (a worker's
    record of a finished job must not be dropped because Redis was full for a while), and
    retries no other error Redis answers."""

    def __init__(self, backoff: AbstractBackoff, retries: int) -> None:
        super().__init__(
            backoff,
            retries,
            supported_errors=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError),
        )

    def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False) -> Any:
        def retryable(error: Exception) -> bool:
            if isinstance(error, redis.exceptions.ResponseError) and refusal(error) is None:
                return False
            return is_retryable(error) if is_retryable else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def assess(info: Any, save: Any, probe: Any) -> RedisCheck:
    """Judge the answers to ``INFO``, ``CONFIG GET save`` and a probe write (each the reply,
    or the error Redis gave instead)."""
    warnings = []
    if isinstance(info, Exception):
        warnings.append(f"could not read Redis's INFO ({info}): its eviction policy and persistence are unchecked")
        info = {}
    policy = info.get("maxmemory_policy")
    problem = None
    if policy is not None and policy != NOEVICTION:
        problem = (
            f"Redis evicts keys (maxmemory-policy {policy}): at its memory limit it would delete accepted jobs, "
            f"their queue messages and indexes without a word. Set maxmemory-policy {NOEVICTION} "
            "(a full Redis then refuses new jobs with 503 instead)."
        )
    if "aof_enabled" in info and not int(info["aof_enabled"]):
        schedule = None if isinstance(save, Exception) else (save or {}).get("save")
        if schedule == "":
            warnings.append(
                'Redis persists nothing (appendonly no, save ""): a restart of Redis loses every job it holds. '
                "Set appendonly yes (appendfsync everysec)."
            )
        elif schedule is None:
            warnings.append(
                "Redis keeps no append-only file (appendonly no), and CONFIG GET save was refused: a crash loses "
                "the jobs accepted since its last snapshot, if it takes any. Set appendonly yes (appendfsync everysec)."
            )
        else:
            warnings.append(
                f'Redis persists by snapshots only (save "{schedule}", appendonly no): a crash loses the jobs accepted '
                "since the last snapshot. Set appendonly yes (appendfsync everysec)."
            )
    refusing = refusal(probe) if isinstance(probe, Exception) else None
    if isinstance(probe, Exception) and refusing is None:
        raise probe
    return RedisCheck(problem=problem, refusing=refusing, warnings=tuple(warnings))


def _queue(pipe: Any, probe_key: str) -> None:
    pipe.info()
    pipe.config_get("save")
    pipe.set(probe_key, b"1", px=PROBE_TTL_MS)


def check(client: redis.Redis, *, probe_key: str) -> RedisCheck:
    """Look at Redis once (one round trip): its policy, its persistence, whether it takes a
    write. Raises ``redis.ConnectionError`` and the like when Redis cannot be reached."""
    with client.pipeline(transaction=False) as pipe:
        _queue(pipe, probe_key)
        return assess(*pipe.execute(raise_on_error=False))


async def check_async(client: redis.asyncio.Redis, *, probe_key: str) -> RedisCheck:
    """:func:`check` for the API's asyncio client."""
    async with client.pipeline(transaction=False) as pipe:
        _queue(pipe, probe_key)
        return assess(*await pipe.execute(raise_on_error=False))


def enforce(found: RedisCheck, log: logging.Logger) -> None:
    """At start: log each warning, and refuse to run on a Redis that evicts."""
    for warning in found.warnings:
        log.warning("%s", warning)
    if found.problem:
        raise RedisMisconfigured(found.problem)
    if found.refusing:
        log.warning("%s", found.refusing)


def check_at_start(settings: Settings, *, log: logging.Logger) -> None:
    """A process's start-up check (:func:`check`, then :func:`enforce`): raises
    ``RedisMisconfigured`` on a Redis that evicts. An unreachable Redis is only logged: the
    process waits for it as it would anyway, and ``/readyz`` checks again."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        found = check(client, probe_key=Keys(settings.redis_prefix).readyz)
    except redis.exceptions.RedisError as error:
        log.warning("could not check Redis's configuration (%s); /readyz checks it again", error)
        return
    finally:
        client.close()
    enforce(found, log)
