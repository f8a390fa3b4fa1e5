"""The HTTP client webhook deliveries are sent with: no redirects followed, no proxies from
the environment, each attempt within the receiver's time in all, and (unless private
addresses are allowed) connections to public addresses only (``addresses.py``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

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

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
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

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        options: dict[str, Any] = {"local_address": local_address, "socket_options": socket_options}
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


#: httpcore's errors as httpx raises them, so the deliverer catches httpx's (as httpx's own
#: transport maps them; the names are the same in both).
HTTPX_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.ProxyError: httpx.ProxyError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.ProtocolError: httpx.ProtocolError,
}


@contextmanager
def httpx_errors() -> Iterator[None]:
    """Raise an httpcore error as the most specific httpx error of the same name."""
    try:
        yield
    except Exception as error:
        mapped = next((HTTPX_ERRORS[kind] for kind in type(error).__mro__ if kind in HTTPX_ERRORS), None)
        if mapped is None:
            raise
        raise mapped(str(error)) from error


class _Body(httpx.SyncByteStream):
    """A response body read off httpcore, its errors raised as httpx's."""

    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class DeliveryTransport(httpx.BaseTransport):
    """httpx's transport for deliveries: an httpcore pool that connects through
    ``DeliveryBackend``. httpx's own ``HTTPTransport`` takes no network backend, so this one
    holds the pool and maps requests and answers as that one does."""

    def __init__(self, *, public_only: bool) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=100,
            keepalive_expiry=5.0,  # httpx's default: a receiver's idle connection is not kept for ever
            network_backend=DeliveryBackend(public_only=public_only),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)  # a sync client's request
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port, target=request.url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with httpx_errors():
            answer = self._pool.handle_request(core_request)
        assert isinstance(answer.stream, Iterable)  # a sync pool's answer
        return httpx.Response(
            status_code=answer.status, headers=answer.headers, stream=_Body(answer.stream), extensions=answer.extensions
        )

    def close(self) -> None:
        self._pool.close()


def http_client(settings: Settings) -> httpx.Client:
    """The HTTP client deliveries are sent with: no redirects followed, no proxies (the
    transport reads none from the environment), attempts within ``time_limit``, and (unless
    private addresses are allowed) public addresses only."""
    return httpx.Client(
        transport=DeliveryTransport(public_only=not settings.webhook_allow_private),
        timeout=settings.webhook_timeout_s,
        follow_redirects=False,
        headers={"user-agent": "blaze-jobs-webhooks/1", "content-type": "application/json"},
    )
