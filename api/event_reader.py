"""The API process's one reader of job events: it serves every long-poll and event stream,
so a waiting client holds no Redis connection of its own.

The reader holds one connection, blocked in ``XREAD`` on the streams of every job someone
waits on. Each entry it reads is parsed once and handed to every waiter of that job. When a
waiter starts watching a job the blocked read does not cover, the read is interrupted with
``CLIENT UNBLOCK`` (sent on the ordinary pool) and issued again with the new stream; nothing
polls Redis for events. A stream whose ``job.completed`` was read is left out of the reads
that follow (nothing comes after it), so the reader does not block on a finished job's
stream for the next waiter to interrupt.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
import redis.exceptions
from fastapi import FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from blaze_jobs import events
from blaze_jobs.events import JobEvent, event_order
from blaze_jobs.settings import Settings

from .connections import Busy
from .request_context import settings_of

log = logging.getLogger("blaze_jobs.api.event_reader")

#: Tries at interrupting a read that is still on its way to Redis (CLIENT UNBLOCK finds no
#: blocked client until it arrives), a millisecond or so apart; after them the read's own
#: block ends it. A property of that race, not a deployment's choice, so not a setting.
UNBLOCK_TRIES = 50


class TooManyWaiters(Busy):
    """The process already serves ``BLAZE_MAX_WAITERS`` long-polls and event streams."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"this API process already serves {limit} waiting clients (BLAZE_MAX_WAITERS)")


class Feed:
    """One waiter's view of a job's events: each event after its starting point, once, in order."""

    def __init__(self, after: str) -> None:
        self.after = after  # the last event handed to this waiter
        self._queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._backlog: list[JobEvent] = []

    def offer(self, event: JobEvent) -> None:
        if event_order(event.id) > event_order(self.after):
            self.after = event.id
            self._queue.put_nowait(event)

    async def next_events(self, timeout: float) -> list[JobEvent]:
        """The events that have come, waiting up to ``timeout`` seconds for the first; [] if none."""
        if self._backlog:
            backlog, self._backlog = self._backlog, []
            return backlog
        try:
            first = await asyncio.wait_for(self._queue.get(), max(0.0, timeout))
        except asyncio.TimeoutError:
            return []
        batch = [first]
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch


@dataclass(eq=False)
class _Watch:
    """A job stream in the read: the id read up to, and the feeds waiting on it."""

    position: str
    feeds: set[Feed] = field(default_factory=set)
    #: The job's job.completed was read: no event comes after it, so the stream is read no more
    #: (its waiters leave once they have it; one joining later reads what it missed itself).
    ended: bool = False


class EventReader:
    """The process's one reader of job streams; ``watch`` gives a waiter its feed."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.redis = client  # the ordinary pool: interrupts and the backlog of late joiners
        self._connection = redis.asyncio.Redis.from_url(
            settings.redis_url,
            single_connection_client=True,
            socket_timeout=settings.event_read_block_s + settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            # A failed read is retried here, after a new CLIENT ID, never silently inside redis-py.
            retry=Retry(NoBackoff(), 0),
        )
        self._watches: dict[str, _Watch] = {}
        self._waiters = 0
        self._generation = 0  # counts streams joining the read
        self._reading: int | None = None  # the generation of the read in flight
        self._client_id: int | None = None
        self._idle_wake = asyncio.Event()
        self._interrupt_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        allow_sockets(self.settings.max_waiters)
        self._tasks = [asyncio.create_task(self._read(), name="blaze-event-reader"), asyncio.create_task(self._interrupt())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._connection.aclose()

    @property
    def waiters(self) -> int:
        return self._waiters

    @asynccontextmanager
    async def watch(self, job_id: str, *, after: str) -> AsyncIterator[Feed]:
        """A feed of the job's events after ``after``, for as long as the block runs."""
        if self._waiters >= self.settings.max_waiters:
            raise TooManyWaiters(self.settings.max_waiters)
        key = events.stream_key(self.settings.redis_prefix, job_id)
        feed = Feed(after)
        backlog_until: str | None = None
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = _Watch(position=after)
            self._generation += 1
            self._idle_wake.set()
            self._interrupt_wake.set()
        elif event_order(after) < event_order(watch.position):
            # The read is past where this waiter starts: what lies between is read once, here.
            backlog_until, feed.after = watch.position, watch.position
        watch.feeds.add(feed)
        self._waiters += 1
        try:
            if backlog_until is not None:
                feed._backlog = await events.events_between(self.redis, key, after=after, until=backlog_until)
            yield feed
        finally:
            watch.feeds.discard(feed)
            self._waiters -= 1
            if not watch.feeds and self._watches.get(key) is watch:
                del self._watches[key]  # the next read leaves it out; no need to interrupt this one

    async def _read(self) -> None:
        backoff = 0.1
        while True:
            # Without this, a read right after a job's end would block on its stream until its
            # waiters left, and the next waiter would have to interrupt it.
            if not any(not watch.ended for watch in self._watches.values()):
                self._idle_wake.clear()
                await self._idle_wake.wait()
                continue
            try:
                if self._client_id is None:  # a new connection: the id its interrupts name
                    self._client_id = await self._connection.client_id()
                built = {key: (watch, watch.position) for key, watch in self._watches.items() if not watch.ended}
                self._reading = self._generation
                try:
                    # A list of [stream, [(entry id, fields), ...]] (redis-py types it loosely).
                    reply: list[Any] = await self._connection.xread(  # type: ignore[assignment]
                        {key: position for key, (_, position) in built.items()},
                        count=self.settings.event_read_count,
                        block=int(self.settings.event_read_block_s * 1000),
                    )
                finally:
                    self._reading = None
                backoff = 0.1
            except (redis.exceptions.RedisError, OSError) as error:
                # Waiters keep waiting; once Redis answers again the read goes on from where
                # it was, so nothing written meanwhile is missed.
                self._client_id = None
                log.warning("the event reader could not read from Redis (%s); retrying in %.1f s", error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)
                continue
            for raw_key, entries in reply or []:
                key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
                watch = built[key][0] if key in built else None
                # A stream whose waiters all left, or that was watched anew from elsewhere
                # meanwhile, is read again from its own position next time.
                if watch is None or self._watches.get(key) is not watch:
                    continue
                for entry_id, fields in entries:
                    event = JobEvent.parse(entry_id, fields)
                    for feed in list(watch.feeds):
                        feed.offer(event)
                    watch.position = event.id
                    watch.ended = watch.ended or event.type == events.COMPLETED

    async def _interrupt(self) -> None:
        while True:
            await self._interrupt_wake.wait()
            self._interrupt_wake.clear()
            # Only a read issued before a stream joined needs interrupting.
            for attempt in range(UNBLOCK_TRIES):
                reading, client_id = self._reading, self._client_id
                if reading is None or reading >= self._generation or client_id is None:
                    break
                try:
                    if await self.redis.client_unblock(client_id):
                        break
                except (redis.exceptions.RedisError, OSError, Busy):
                    break  # the reader meets the same fault and reconnects on its own
                await asyncio.sleep(0.001 * (1 + attempt // 10))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the process's reader (``app.state.reader``) while the app serves."""
    app.state.reader = EventReader(settings_of(app), app.state.redis)
    await app.state.reader.start()
    yield
    await app.state.reader.close()


def allow_sockets(waiters: int) -> None:
    """Raise this process's soft limit on open files towards what ``waiters`` clients need
    (each is a socket); warn when the hard limit is below it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = waiters + 1024  # the clients that do not wait, Redis, logs, modules
    if soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < wanted:
        log.warning(
            "open-file limit %d is below the %d that BLAZE_MAX_WAITERS=%d needs; raise ulimit -n", raised, wanted, waiters
        )
