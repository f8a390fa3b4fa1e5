"""The broker transport of Blaze Jobs' Celery app: kombu's Redis transport, with channels that
keep working after a Redis restart (``celeryconfig.broker_transport`` names it).

Why a transport of our own: a kombu Redis channel looks up where Redis is (host, port,
password, timeouts) on the kombu ``Connection`` that owns its transport, each time it builds a
connection pool, and it drops its pool when it closes. When a worker loses Redis, Celery
*collects* the broken ``Connection`` first, which detaches it from the transport, and closes
it after. A channel that was not closed during the collect (one whose blocking read or fanout
unbinding failed first) is closed then, and closing it restores its unacknowledged messages:
it builds a pool again, finds no ``Connection``, and raises ``AttributeError: 'NoneType'
object has no attribute 'hostname'``. That is no connection error, so Celery calls it
unrecoverable and the worker process exits, leaving its queue without a consumer (kombu#582,
kombu#970, celery#10205). The acknowledgement of a job that ran through the outage, which goes
through the same old channel, fails the same way.

The channel's Redis does not change during its life, so ours resolves the connection
parameters once, when it is created, and builds every later pool from those: closing it after
the collect reaches Redis (or fails with a connection error, which Celery rides out), and a
late acknowledgement reaches Redis. Unacknowledged messages that could not be restored stay
in Redis's unacked index, where the visibility timeout hands them back.

At its memory limit a ``noeviction`` Redis still hands out a queued message (taking it frees
memory) but refuses to record it as unacknowledged (a write), and refuses the MULTI in which
kombu deletes that record on acknowledgement. kombu raises either way, which kills the
worker; the message taken, in no queue and in no record, is lost. Ours waits until Redis
records a message taken (meanwhile the worker takes no further one, right while Redis can
record none), and acknowledges with plain deletes, which Redis allows when full.

The extension is the one kombu's own Sentinel transport uses (a ``Channel`` subclass that
overrides how connection parameters are made, on a ``Transport`` subclass naming it).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from blaze_jobs.redis_config import refusal

log = logging.getLogger("blaze_jobs.transport")

#: Longest pause between attempts to record a message while Redis refuses writes.
REFUSED_WAIT_MAX_S = 2.0


class QoS(kombu_redis.QoS):
    """kombu's acknowledgement emulation, waiting out a Redis that refuses writes."""

    def append(self, message: Any, delivery_tag: str) -> None:
        wait = 0.05
        while True:
            try:
                return self._record(message, delivery_tag)
            except redis.exceptions.ResponseError as error:
                why = refusal(error)
                # A worker asked to stop gives up; the reaper queues the job again later.
                if why is None or _stopping():
                    raise
                if wait == 0.05:
                    log.warning("%s: holding the message just taken until Redis records it", why)
                time.sleep(wait)
                wait = min(2 * wait, REFUSED_WAIT_MAX_S)

    def _record(self, message: Any, delivery_tag: str) -> None:
        # kombu records a message taken (its index entry, then the message) in a MULTI: four
        # commands of every job's. The same two writes pipelined need no transaction: kombu
        # restores only records older than the visibility timeout, so one half written is
        # never restored early, and a pair Redis refused is written again whole (``append``).
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(self.unacked_key, delivery_tag, record).execute()
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self._forget(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            return super().reject(delivery_tag, requeue=True)
        self._forget(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def _forget(self, delivery_tag: str) -> None:
        # kombu deletes the record in a MULTI, and at its memory limit Redis refuses every
        # command queued in a MULTI, deletes included, so the ack of a finished job raised and
        # killed the worker. Two plain deletes need no transaction: the record first, since an
        # index entry without one restores nothing.
        with self.channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.hdel(self.unacked_key, delivery_tag).zrem(self.unacked_index_key, delivery_tag).execute()


class Channel(kombu_redis.Channel):
    """A Redis channel that keeps the connection parameters it was created with."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._resolved: dict[bool, dict[str, Any]] = {}
        # The parent connects (PING) here, through the asynchronous parameters.
        super().__init__(*args, **kwargs)
        self._connparams(asynchronous=False)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if asynchronous not in self._resolved:
            self._resolved[asynchronous] = super()._connparams(asynchronous=asynchronous)
        # A copy: the pool's keyword arguments are the caller's to keep.
        return dict(self._resolved[asynchronous])


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def _stopping() -> bool:
    """Was the worker asked to stop? Celery sets the exit code there (0 included), so test
    as its own ``maybe_shutdown`` does: anything but None or False."""
    return any(flag is not None and flag is not False for flag in (worker_state.should_stop, worker_state.should_terminate))
