"""Celery's task events (what Flower shows of each job), published in batches.

A worker sends three task events per job (received, started, succeeded). Celery already
buffers them, but flushes the buffer on the event loop's next turn, so each one is a Redis
``PUBLISH`` of its own: three of an echo job's commands. Our consumer flushes a moment
later instead (``Settings.task_events_flush_s``): the events of a short job, or of every job
a busy worker ran meanwhile, leave in one ``PUBLISH`` (Celery's ``task.multi``, which Flower
reads as it reads single events), a fraction of a second later than before. Celery still
flushes at once when 24 wait (its ``buffer_limit``), and ours flushes before it shuts down.

``celeryconfig.worker_consumer`` names this class; only worker processes load it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from blaze_jobs.settings import get_settings

#: A flush that has not run this long after it was due is taken for lost (the event loop was
#: reset as the worker reconnected to Redis) and another one is scheduled.
LOST_FLUSH_S = 1.0


class Consumer(CeleryConsumer):
    """Celery's worker consumer, flushing buffered task events after a short delay."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task_events_flush_s = get_settings().task_events_flush_s
        self._flush_lock = threading.Lock()
        self._flush_due: float | None = None  # when the one pending flush runs (monotonic)

    def on_send_event_buffered(self) -> None:
        # Called on the thread that sent the event (a task thread, or the loop's own). One
        # flush pending at a time, so a steady stream of events still leaves in batches.
        if self.hub is None:
            return
        now = time.monotonic()
        with self._flush_lock:
            if self._flush_due is not None and now < self._flush_due + LOST_FLUSH_S:
                return
            self._flush_due = now + self.task_events_flush_s
        # The loop's timer is not thread-safe: the delayed flush is set from the loop's thread.
        self.hub.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        if self.hub is not None:
            self.hub.call_later(self.task_events_flush_s, self._flush_now)

    def _flush_now(self) -> None:
        with self._flush_lock:
            self._flush_due = None
        self._flush_events()

    def shutdown(self) -> None:
        # A job that ended just before a warm shutdown still shows as ended in Flower.
        self._flush_events()
        super().shutdown()
