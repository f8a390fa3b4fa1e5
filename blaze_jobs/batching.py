"""The Batcher: one per device. Task threads hand it their job and wait on a future; its
device thread groups compatible jobs (equal batch keys) and runs each group as one engine
call, as soon as the group is full or its oldest job has waited ``max_wait_ms``.

Each job stays its own Celery task (own ack, retry, cancel, Flower row); only the device
work is shared. Batches never mix batch keys, so never models. What a job's input names
from elsewhere (an input image by URL or artifact) is fetched on its task thread before it
joins a group (``Engine.fetch_inputs``): a slow fetch holds no device, a bad one fails only its job.

The batcher keeps the device's busy time (``busy``: in all, and its share of the last minute,
shown by ``GET /v1/workers``) and, with metrics on, records each batch: its size, its fill
against ``max_batch``, how long its first job waited for it to be due (full, or
``max_wait_ms`` reached: not the time it then waited for the device), and its device time.
A continuous engine (llm) forms no batches here: sequences join and leave its running batch
token by token. For it, each job records once, as it ends, the largest batch it ran in
(size and fill), and the device counts as busy while any of its jobs is in flight (its loop
steps whenever it holds a sequence); it has no form wait nor per-batch device time. An engine
that never batches (echo) runs its jobs side by side on their task threads: each is a batch
of one with no fill, and the device is busy while any of them runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from blaze_jobs import metrics
from blaze_jobs.engines.base import Engine, EngineRequest, OutputFuture, request_territory
from blaze_jobs.engines.spec import Batching
from blaze_jobs.errors import BlazeError, HandedBack

log = logging.getLogger("blaze_jobs.batching")


@dataclass
class Result:
    """What a job gets back: its output, and the size of the batch it ran in."""

    output: dict[str, Any]
    batch_size: int


@dataclass
class _Pending:
    request: EngineRequest
    future: Future
    since: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch
        self.batches_run = 0
        #: The device's busy fraction over the last minute (GET /v1/workers, blaze_device_busy_ratio).
        self.busy = metrics.BusyWindow()
        self._groups: dict[tuple, list[_Pending]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="blaze-device", daemon=True)
        self._thread.start()

    def submit(self, request: EngineRequest) -> Future[Result]:
        """Queue a job for the device; the future resolves to its ``Result`` or its error."""
        future: Future = Future()
        batching = self.engine.spec.batching
        if batching is Batching.continuous:
            # The engine schedules token by token itself.
            inner = self.engine.submit(request)
            self.busy.begin()
            inner.add_done_callback(lambda _: self._continuous_ended(inner, future))
            return future
        try:
            # Fetched here, on the job's task thread: a slow download holds no device.
            with request_territory("input"):
                self.engine.fetch_inputs(request)
        except BlazeError as error:  # a bad or unreachable input, or a store the worker cannot reach
            future.set_exception(error)
            return future
        if batching is Batching.none:
            self._run_alone(request, future)
            return future
        try:
            with request_territory("batch key"):
                key = self.engine.batch_key(request)
        except BlazeError as error:  # a bad request, or a model that will not load
            future.set_exception(error)
            return future
        with self._cond:
            if self._closed:
                future.set_exception(HandedBack("the worker is shutting down"))
                return future
            self._groups.setdefault(key, []).append(_Pending(request, future))
            self._cond.notify()
        return future

    def fail_waiting(self, error: BaseException) -> int:
        """Fail every job not yet on the device (the breaker opened); returns how many."""
        with self._cond:
            waiting = [p for group in self._groups.values() for p in group]
            self._groups.clear()
        for pending in waiting:
            pending.future.set_exception(error)
        return len(waiting)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        # Jobs that never reached the device are no fault of theirs: back to the queue, uncounted.
        self.fail_waiting(HandedBack("the worker is shutting down"))

    # --- the device thread ----------------------------------------------------------

    def _next_batch(self) -> tuple[list[_Pending], float] | None:
        """Block until a group is due: full, or its oldest job has waited long enough. Returns
        it with the time its oldest job waited until then (a batch that was due while the
        device ran another waited for the device, not to form)."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._groups:
                    key, group = min(self._groups.items(), key=lambda item: item[1][0].since)
                    due = group[0].since + self.max_wait_s
                    if len(group) >= self.max_batch:
                        due = min(due, group[self.max_batch - 1].since)
                    now = time.monotonic()
                    if now >= due:
                        batch, rest = group[: self.max_batch], group[self.max_batch :]
                        if rest:
                            self._groups[key] = rest
                        else:
                            del self._groups[key]
                        return batch, due - batch[0].since
                    self._cond.wait(timeout=due - now)
                else:
                    self._cond.wait()

    def _loop(self) -> None:
        while (due := self._next_batch()) is not None:
            # Jobs canceled while they waited leave before the device sees them.
            batch = [p for p in due[0] if p.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            started = self._began()
            try:
                results = self.engine.run_batch([p.request for p in batch])
            except BaseException as error:  # the whole batch failed: every member learns why
                results = [error] * len(batch)
            elapsed = self._ran(len(batch), started, formed_in=due[1])
            self.batches_run += 1
            if self.on_batch:
                self.on_batch(len(batch), elapsed)
            for pending, result in zip(batch, results, strict=False):
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(Result(result, len(batch)))

    def _run_alone(self, request: EngineRequest, future: Future) -> None:
        """An engine that never batches runs each job on its task thread, as a batch of one."""
        future.set_running_or_notify_cancel()
        started = self._began()
        try:
            (result,) = self.engine.run_batch([request])
        except BaseException as error:
            result = error
        self._ran(1, started, formed_in=None)
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(Result(result, 1))

    def _began(self) -> float:
        """Note a batch starting on the device now; returns when (monotonic)."""
        self.busy.begin()
        return time.monotonic()

    def _ran(self, size: int, started: float, *, formed_in: float | None) -> float:
        """Note a batch that ran from ``started`` until now; returns its device time."""
        ended = time.monotonic()
        self.busy.end()
        if metrics.enabled():
            self._record_batch(size, formed_in=formed_in, device_s=ended - started)
        return ended - started

    def _record_batch(self, size: int, *, formed_in: float | None, device_s: float | None) -> None:
        engine = self.engine.name
        metrics.BATCH_SIZE.labels(engine).observe(size)
        if self.engine.spec.batching is not Batching.none:  # a batch of one by design fills nothing
            metrics.BATCH_FILL.labels(engine).observe(size / self.max_batch)
        if formed_in is not None:
            metrics.BATCH_FORM_SECONDS.labels(engine).observe(formed_in)
        if device_s is not None:
            metrics.BATCH_DEVICE_SECONDS.labels(engine).observe(device_s)

    # --- a continuous engine's jobs -------------------------------------------------

    def _continuous_ended(self, done: OutputFuture, future: Future[Result]) -> None:
        self.busy.end()
        if metrics.enabled():
            self._record_batch(done.batch_size, formed_in=None, device_s=None)
        _relay(done, future)


def _relay(done: OutputFuture, future: Future[Result]) -> None:
    if done.exception() is not None:
        future.set_exception(done.exception())
    else:
        future.set_result(Result(done.result(), done.batch_size))
