"""The API process's Redis connections: one bounded pool that requests wait for, so a burst
beyond its size queues for a moment instead of failing; a wait that runs out is the API
being busy (503 with ``Retry-After``), not Redis being unreachable."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio
import redis.exceptions

from blaze_jobs.settings import Settings


class Busy(Exception):
    """The API process is at a bound of its own; the client should retry shortly (503)."""


class RedisBusy(Busy):
    """Every pooled Redis connection stayed in use for the whole wait."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"no Redis connection came free within {wait_s:g} s")
        self.wait_s = wait_s


class WaitingPool(redis.asyncio.BlockingConnectionPool):
    """A blocking pool whose timed-out wait raises ``RedisBusy`` (the base class raises the
    same ``ConnectionError`` as an unreachable server)."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except redis.exceptions.ConnectionError as error:
            if isinstance(error.__cause__, asyncio.TimeoutError):
                raise RedisBusy(self.timeout or 0) from error
            raise


def connect(settings: Settings) -> redis.asyncio.Redis:
    """The client every request shares: at most ``BLAZE_REDIS_MAX_CONNECTIONS`` connections,
    a request waiting at most ``BLAZE_REDIS_POOL_WAIT_S`` for one."""
    pool = WaitingPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_wait_s,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    return redis.asyncio.Redis.from_pool(pool)  # closing the client closes the pool
