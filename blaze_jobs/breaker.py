"""The circuit breaker: one per worker. Worker faults (device errors, out of memory at
batch size 1, model load failures, a batch overrunning its watchdog) count against it; a bad
request never does.

closed ──N faults in a row──▶ open: stop consuming the queue, hand held jobs back
open ──cool-down──▶ half-open: consume again, let exactly one job through as the probe
half-open ──probe succeeds──▶ closed   /   ──probe faults──▶ open, with twice the cool-down

With metrics on, ``blaze_breaker_state`` shows the state (1 for the current one, 0 for the
others) and ``blaze_breaker_transitions_total`` counts the states entered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from enum import Enum
from typing import Any

from blaze_jobs import metrics

log = logging.getLogger("blaze_jobs.breaker")


class BreakerState(str, Enum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures: int,
        cooldown_s: float,
        engine: str,
        max_cooldown_s: float,
        on_open: Callable[[], None] = lambda: None,
        on_half_open: Callable[[], None] = lambda: None,
        on_change: Callable[[BreakerState], None] = lambda state: None,
    ) -> None:
        self.engine = engine  # the metrics' label
        self.threshold = failures
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.on_open = on_open
        self.on_half_open = on_half_open
        # Told every new state, outside the lock (the worker publishes its state at once).
        self.on_change = on_change
        self.state = BreakerState.closed
        self.cooldown_s = cooldown_s
        self.consecutive_failures = 0
        self.total_failures = 0
        self.times_opened = 0
        self.last_reason = ""
        self._probe_taken = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        if metrics.enabled():
            self._show(BreakerState.closed)

    def allow(self) -> bool:
        """May a job use the device now? In half-open, only the first caller (the probe) may."""
        with self._lock:
            if self.state is BreakerState.closed:
                return True
            if self.state is BreakerState.half_open and not self._probe_taken:
                self._probe_taken = True
                return True
            return False

    def release_probe(self) -> None:
        """The probe ended without a verdict on the device (a bad request, a cancel, a cache
        hit): let the next job be the probe."""
        with self._lock:
            if self.state is BreakerState.half_open:
                self._probe_taken = False

    def record_success(self) -> None:
        with self._lock:
            self.consecutive_failures = 0
            if self.state is not BreakerState.half_open:
                return
            log.warning("breaker closed: the probe succeeded")
            self.state = BreakerState.closed
            self.cooldown_s = self.base_cooldown_s
        self._changed(BreakerState.closed)

    def record_failure(self, reason: str) -> None:
        with self._lock:
            self.total_failures += 1
            self.consecutive_failures += 1
            self.last_reason = reason
            if self.state is BreakerState.half_open:
                self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
                self._open_locked()
            elif self.state is BreakerState.closed and self.consecutive_failures >= self.threshold:
                self._open_locked()
            else:
                return
        self.on_open()
        self._changed(BreakerState.open)

    def _open_locked(self) -> None:
        log.warning(
            "breaker open for %.1f s after %d worker faults: %s", self.cooldown_s, self.consecutive_failures, self.last_reason
        )
        self.state = BreakerState.open
        self.times_opened += 1
        self._timer = threading.Timer(self.cooldown_s, self._half_open)
        self._timer.daemon = True
        self._timer.start()

    def _half_open(self) -> None:
        with self._lock:
            if self.state is not BreakerState.open:
                return
            log.warning("breaker half-open: taking one probe job")
            self.state = BreakerState.half_open
            self._probe_taken = False
        self.on_half_open()
        self._changed(BreakerState.half_open)

    def _changed(self, state: BreakerState) -> None:
        if metrics.enabled():
            metrics.BREAKER_TRANSITIONS.labels(self.engine, state.value).inc()
            self._show(state)
        self.on_change(state)

    def _show(self, state: BreakerState) -> None:
        for each in BreakerState:
            metrics.BREAKER_STATE.labels(self.engine, each.value).set(1 if each is state else 0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": self.state.value,
                "consecutive_failures": self.consecutive_failures,
                "total_failures": self.total_failures,
                "times_opened": self.times_opened,
                "cooldown_s": self.cooldown_s,
                "last_reason": self.last_reason,
            }

    def close(self) -> None:
        if self._timer:
            self._timer.cancel()
