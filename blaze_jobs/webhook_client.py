"""The HTTP client webhook deliveries are sent with: no redirects followed, no proxies from
the environment, each attempt within the receiver's time in all, and (unless private
addresses are allowed) connections to public addresses only (``addresses.py``)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpcore
import httpx

from blaze_jobs.addresses import WebhookRefused, check_addresses, resolve
from blaze_jobs.settings import Settings

_attempt = threading.local()


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Bound everything the HTTP client does on this thread (connect, TLS, every read and
    write) to ``seconds`` in all: httpx's timeouts bound each step alone, so a receiver that
    trickles its answer could otherwise hold an attempt past its deadline."""
    _attempt.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _attempt.deadline = None


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of this thread's ``time_limit``."""
    deadline = getattr(_attempt, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the attempt ran out of time")
    return left if timeout is None else min(timeout, left)


class LimitedStream(httpcore.NetworkStream):
    """A connection whose every read and write ends within the current ``time_limit``."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> httpcore.NetworkStream:
        return LimitedStream(self._stream.start_tls(ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class DeliveryBackend(httpcore.SyncBackend):
    """Connections for deliveries, each within the attempt's ``time_limit``. With
    ``public_only``, to public addresses only, checking the very address it connects to, so
    a DNS answer that changes between a check and the connection (rebinding) cannot reach an
    internal host. TLS still verifies the certificate against the URL's host."""

    def __init__(self, *, public_only: bool) -> None:
        self.public_only = public_only

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **options: Any) -> httpcore.NetworkStream:
        if not self.public_only:
            return LimitedStream(super().connect_tcp(host, port, timeout=_left(timeout, httpcore.ConnectTimeout), **options))
        try:
            addresses = check_addresses(host, resolve(host, port))
        except WebhookRefused as refused:
            raise httpcore.ConnectError(f"refused: {refused}") from None
        last: Exception | None = None
        for address in addresses:
            try:
                stream = super().connect_tcp(address, port, timeout=_left(timeout, httpcore.ConnectTimeout), **options)
                return LimitedStream(stream)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
        raise last  # type: ignore[misc]


def http_client(settings: Settings) -> httpx.Client:
    """The HTTP client deliveries are sent with: no redirects followed, no proxies from the
    environment, attempts within ``time_limit``, and (unless private addresses are allowed)
    public addresses only."""
    transport = httpx.HTTPTransport(trust_env=False)
    # httpx takes no network backend of its own; its pool (httpcore) does.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=100,
        keepalive_expiry=5.0,  # httpx's default: a receiver's idle connection is not kept for ever
        network_backend=DeliveryBackend(public_only=not settings.webhook_allow_private),
    )
    return httpx.Client(
        transport=transport,
        timeout=settings.webhook_timeout_s,
        follow_redirects=False,
        headers={"user-agent": "blaze-jobs-webhooks/1", "content-type": "application/json"},
    )
