"""A worker's inbox: a queue of its own, beside its engine's, that only it consumes.

A job that faulted on a worker must meet another before it is judged (``faults.py``). Put
back on the engine's queue, it goes to whichever worker asks next, and the worker that just
faulted it is often the one asking (its thread is free the moment it hands the job back), so
the job can come back to it again and again. So a worker that draws a job it faulted hands it
to a live peer's inbox instead: that peer runs it next.

A message in an inbox is safe only while the inbox's worker lives. The elected reaper moves
the messages of a dead worker's inbox back to the engine's queue (``drain_dead``), one
``LMOVE`` at a time, so each message is in exactly one list throughout. Inboxes that were
ever handed to are listed in a set (``keys.Keys.inboxes``), so the reaper looks only at those.
"""

from __future__ import annotations

import time

import redis

from blaze_jobs.broker import queue_key
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings


def inbox(engine: str, worker: str) -> str:
    """The name of ``worker``'s inbox queue (a Celery queue, which the worker consumes)."""
    return f"{engine}.inbox.{worker}"


def hand_to(client: redis.Redis, settings: Settings, *, engine: str, worker: str, message: str) -> None:
    """Put a job's message in the inbox of ``worker`` (a live worker of ``engine``)."""
    name = inbox(engine, worker)
    with client.pipeline(transaction=True) as pipe:
        pipe.sadd(Keys(settings.redis_prefix).inboxes, name)
        pipe.rpush(queue_key(settings, name), message)
        pipe.execute()


def drain_dead(client: redis.Redis, settings: Settings) -> int:
    """Move every message in the inbox of a worker whose heartbeat is older than a lease back
    to its engine's queue, and forget the emptied inboxes. Returns how many moved."""
    keys = Keys(settings.redis_prefix)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in client.smembers(keys.inboxes)]
    if not names:
        return 0
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.zscore(keys.workers, name.split(".inbox.", 1)[1])
        beats = pipe.execute()
    moved = 0
    for name, beat in zip(names, beats, strict=True):
        if beat is not None and float(beat) >= time.time() - settings.lease_s:
            continue  # its worker lives, and consumes it
        # Forgotten first: a peer that hands to it meanwhile lists it again, for the next look.
        client.srem(keys.inboxes, name)
        engine = name.split(".inbox.", 1)[0]
        # To the queue's left end, where requeued faulted jobs wait (broker.requeue_push).
        while client.lmove(queue_key(settings, name), queue_key(settings, engine), "RIGHT", "LEFT") is not None:
            moved += 1
    return moved


def inbox_queues(client: redis.Redis, settings: Settings) -> list[str]:
    """The Redis lists of the inboxes that may hold messages."""
    names = client.smembers(Keys(settings.redis_prefix).inboxes)
    return [queue_key(settings, n.decode() if isinstance(n, bytes) else str(n)) for n in names]
