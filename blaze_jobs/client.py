"""The Python clients of the Blaze Jobs HTTP API: ``BlazeClient`` (blocking) and
``AsyncBlazeClient`` (asyncio, in ``client_async.py``), with the same methods; what they share
is in ``client_wire.py``. Every public name of the three is importable from here."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import httpx
import httpx_sse

from blaze_jobs.client_async import AsyncBlazeClient
from blaze_jobs.client_wire import (
    ENDED,
    POLL_S,
    STREAM_READ_TIMEOUT_S,
    STREAM_RECONNECTS,
    SUBMIT_RETRIES,
    SUBMIT_RETRY_PAUSE_S,
    UNKNOWN_OUTCOME,
    ClientOptions,
    LongPoll,
    ServerEvent,
    SSEParser,
    create_body,
    create_request,
    json_of,
    list_params,
    problem_of,
    same_origin,
    unreachable,
)
from blaze_jobs.errors import APIConnectionError, APIError, WaitTimeout
from blaze_jobs.signing import WebhookVerificationError, verify

__all__ = [
    "ENDED",
    "POLL_S",
    "STREAM_READ_TIMEOUT_S",
    "STREAM_RECONNECTS",
    "SUBMIT_RETRIES",
    "SUBMIT_RETRY_PAUSE_S",
    "APIConnectionError",
    "APIError",
    "AsyncBlazeClient",
    "BlazeClient",
    "LongPoll",
    "SSEParser",
    "ServerEvent",
    "WaitTimeout",
    "problem_of",
    "same_origin",
    "unreachable",
]


class BlazeClient(ClientOptions[httpx.Client]):
    """Submit jobs, follow them and fetch their artifacts over HTTP."""

    def _open(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self.headers)

    def __enter__(self) -> BlazeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def submit(
        self,
        engine: str,
        input: dict[str, Any],
        *,
        model: str | None = None,
        webhook: str | None = None,
        webhook_events_filter: Iterable[str] | None = None,
        wait: float | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Create a job; returns it as accepted (``queued``), or, with ``wait``, once it ended
        if it did within that many seconds. ``options`` are further fields (``cache``).

        Every create carries an ``Idempotency-Key``, a fresh one unless ``idempotency_key``
        is given. When the connection fails, a proxy answers 502/504 or the API is still
        making an earlier try's job (409), ``submit`` itself sends the create again with that
        key (``submit_retries`` times), and the API answers the job the first try made, if it
        made one: never two jobs. Pass your own
        ``idempotency_key`` to retry safely yourself, for 24 h (``BLAZE_IDEMPOTENCY_TTL_S``)."""
        body = create_body(engine, input, model=model, webhook=webhook, webhook_events_filter=webhook_events_filter, **options)
        headers, timeout = create_request(wait, self.timeout, idempotency_key)
        for attempt in range(self.submit_retries + 1):
            last = attempt == self.submit_retries
            try:
                response = self._send("POST", "/v1/jobs", json=body, headers=headers, timeout=timeout)
            except APIConnectionError:
                if last:
                    raise
            else:
                if last or response.status_code not in UNKNOWN_OUTCOME:
                    return json_of(response)
            time.sleep(SUBMIT_RETRY_PAUSE_S * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def get(self, job_id: str, *, wait: float | None = None) -> dict[str, Any]:
        """The job; with ``wait``, as soon as it ends or after ``wait`` seconds (long-poll)."""
        params = {"wait": wait} if wait else None
        return json_of(self._send("GET", f"/v1/jobs/{job_id}", params=params, timeout=self.timeout + (wait or 0)))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return json_of(self._send("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, *, timeout: float = 600.0) -> dict[str, Any]:
        """The job once it has ended, long-polling as long as the server allows (no busy
        loop); ``WaitTimeout`` (a ``TimeoutError``, with the job as last seen) if it has not
        within ``timeout`` seconds. Rides out the API's brief 503s and lost connections."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            asked = self._long_poll.length(left)
            try:
                job = self.get(job_id, wait=asked)
            except APIError as error:
                if self._long_poll.refused(error, asked):
                    continue
                if error.status != 503 or left <= 0:
                    raise
                time.sleep(min(1.0, max(left, 0)))
                continue
            except APIConnectionError:
                if left <= 0:
                    raise
                time.sleep(min(1.0, max(left, 0)))
                continue
            if job["status"] in ENDED:
                return job
            if time.monotonic() >= deadline:
                raise WaitTimeout(job_id, job, timeout)
            if not asked:
                time.sleep(min(self.poll_s, max(deadline - time.monotonic(), 0)))

    def download(self, url: str) -> bytes:
        """The bytes of an artifact, by the URL in a job's output (a path, or an absolute URL:
        the key goes with it only to the API's own scheme, host and port)."""
        request = self._download_request(url)
        try:
            response = self.http.send(request)
        except httpx.TransportError as error:
            raise unreachable(error) from error
        if response.status_code != 200:
            json_of(response)
        return response.content

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, url, **kwargs)
        except httpx.TransportError as error:
            raise unreachable(error) from error

    def events(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[ServerEvent]:
        """The job's server-sent events until its end: first ``job`` (the job as it stands),
        then ``job.started``, ``job.progress`` …, last ``job.completed`` (the final job). A
        dropped connection is resumed with ``Last-Event-ID``, so no event is missed."""
        last, failures = last_event_id, 0
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            timeout = httpx.Timeout(self.timeout, read=self.stream_read_timeout_s)
            try:
                url = f"/v1/jobs/{job_id}/events"
                with httpx_sse.connect_sse(self.http, "GET", url, headers=headers, timeout=timeout) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        json_of(source.response)
                    for sse in source.iter_sse():
                        event = ServerEvent.of(sse)
                        if event is None:
                            continue
                        last, failures = event.id or last, 0
                        yield event
                        if event.final:
                            return
                return  # the server ended the stream: the client had seen everything
            except httpx.TransportError as error:  # httpx_sse.SSEError (not an event stream) among them
                failures += 1
                if failures > self.stream_reconnects:
                    raise unreachable(error) from error
                time.sleep(min(2.0, 0.1 * 2**failures))

    #: DESIGN.md's name for ``events``.
    stream = events

    def list_jobs(
        self, *, status: str | None = None, engine: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """A page of the tenant's jobs, newest first: ``{"jobs": [...], "next_cursor": ...}``
        (pass ``next_cursor`` as ``cursor`` for the next page; None on the last)."""
        params = list_params(status=status, engine=engine, limit=limit, cursor=cursor)
        return json_of(self._send("GET", "/v1/jobs", params=params))

    def workers(self) -> list[dict[str, Any]]:
        """The live workers (an admin key's view): engine, models, breaker, jobs held, last beat."""
        return json_of(self._send("GET", "/v1/workers"))["workers"]

    def queues(self) -> list[dict[str, Any]]:
        """Each engine's queue: its depth and the age of the job at its head."""
        return json_of(self._send("GET", "/v1/queues"))["queues"]

    def position(self, job_id: str) -> dict[str, Any]:
        """The job's place in its engine's queue (``position``: 1 is the next one taken)."""
        return json_of(self._send("GET", f"/v1/jobs/{job_id}/position"))

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """The job's webhook deliveries, each with its attempts."""
        return json_of(self._send("GET", f"/v1/jobs/{job_id}/deliveries"))["deliveries"]

    def redeliver(self, job_id: str, delivery_id: str) -> dict[str, Any]:
        """Send a delivery's event to the webhook again; returns the new delivery."""
        return json_of(self._send("POST", f"/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver"))

    def webhook_secret(self) -> str:
        """The ``whsec_`` secret the key's tenant signs webhooks with (``webhook_secret=`` if given)."""
        if self._secret is not None:
            return self._secret
        return (self._held.secrets or self._fetch_secrets())[0]

    def _fetch_secrets(self) -> list[str]:
        return self._held.hold(json_of(self._send("GET", "/v1/webhooks/secret")))

    def verify_webhook(self, headers: Mapping[str, str], body: bytes | str) -> dict[str, Any]:
        """The event a webhook request carries, once its signature holds; raises
        ``blaze_jobs.signing.WebhookVerificationError`` otherwise. Without ``webhook_secret=``
        it verifies with the tenant's secrets, read from the API again (at most every
        ``signing.REFETCH_S``) when none verifies: the tenant may have rotated its secret."""
        if self._secret is not None:
            return verify(self._secret, headers, body)
        try:
            return verify(self._held.secrets or self._fetch_secrets(), headers, body)
        except WebhookVerificationError:
            if not self._held.stale:
                raise
            return verify(self._fetch_secrets(), headers, body)
