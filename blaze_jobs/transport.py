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

The extension is the one kombu's own Sentinel transport uses (a ``Channel`` subclass that
overrides how connection parameters are made, on a ``Transport`` subclass naming it).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A Redis channel that keeps the connection parameters it was created with."""

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
