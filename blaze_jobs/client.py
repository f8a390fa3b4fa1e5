"""The Python clients of the Blaze Jobs HTTP API: ``BlazeClient`` (blocking) and
``AsyncBlazeClient`` (asyncio), with the same methods."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
import httpx_sse

# httpx-sse reads a response's events with this decoder; SSEParser offers the same rules for
# lines a caller already has (httpx-sse exports no decoder of its own).
from httpx_sse._decoders import SSEDecoder

from blaze_jobs.errors import APIConnectionError, APIError, WaitTimeout
from blaze_jobs.signing import HeldSecrets, WebhookVerificationError, verify

__all__ = ["APIConnectionError", "APIError", "AsyncBlazeClient", "BlazeClient", "SSEParser", "ServerEvent", "WaitTimeout"]

ENDED = ("succeeded", "failed", "canceled")
# Defaults of the clients' keyword options. They are the client's own: it runs where the
# server's settings cannot be read, so they are not in blaze_jobs.settings.
#: Between polls of a server that allows no long-poll at all (its BLAZE_MAX_WAIT_S is 0).
POLL_S = 1.0
#: An event stream sends a keep-alive every 15 s (BLAZE_EVENT_KEEP_ALIVE_S); a read this
#: long without one is a dead link.
STREAM_READ_TIMEOUT_S = 60.0
#: Times an event stream reconnects (with ``Last-Event-ID``) before giving up.
STREAM_RECONNECTS = 5
#: Times ``submit`` sends its create again when the connection failed or a proxy answered
#: 502/504 (whether the job was made is unknown then), or a 409 says an earlier try is still
#: being created: each retry carries the first one's ``Idempotency-Key``, so the API makes
#: one job whatever happened. Pauses 0.5 s, then 1 s.
SUBMIT_RETRIES = 2
SUBMIT_RETRY_PAUSE_S = 0.5
#: Answers after which a create may or may not have been made: a proxy lost the API's answer
#: (502, 504), or an earlier try with the same key is still being created (409).
UNKNOWN_OUTCOME = frozenset({409, 502, 504})


HTTP = TypeVar("HTTP", httpx.Client, httpx.AsyncClient)


class _Options(Generic[HTTP]):
    """What both clients hold: the API's address, timeouts, the webhook secret, an HTTP client."""

    http: HTTP

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        api_key: str | None = None,
        webhook_secret: str | None = None,
        admin_token: str | None = None,
        poll_s: float = POLL_S,
        stream_read_timeout_s: float = STREAM_READ_TIMEOUT_S,
        stream_reconnects: int = STREAM_RECONNECTS,
        submit_retries: int = SUBMIT_RETRIES,
    ) -> None:
        """``api_key`` (by default ``BLAZE_API_KEY``) is sent as ``Authorization: Bearer`` on
        every request; ``admin_token`` is its older name. ``webhook_secret`` verifies webhooks;
        without it, ``verify_webhook`` fetches the key's tenant's secrets (again after a rotation).
        ``submit_retries``: how often ``submit`` tries again, with the same idempotency key,
        when it cannot tell whether its job was made."""
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._secret = webhook_secret
        self._held = HeldSecrets()  # the tenant's secrets, fetched when no webhook_secret is given
        self.api_key = api_key or admin_token or os.environ.get("BLAZE_API_KEY") or None
        self.headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._long_poll = LongPoll()
        self.poll_s, self.stream_read_timeout_s, self.stream_reconnects = poll_s, stream_read_timeout_s, stream_reconnects
        self.submit_retries = submit_retries
        self.http = self._open()

    def _open(self) -> HTTP:
        raise NotImplementedError

    def _download_request(self, url: str) -> httpx.Request:
        """The GET of an artifact URL: with the key only to the API's own origin. A signed URL
        needs no key, and one that leads elsewhere (a CDN, a store, a URL from a webhook body)
        must not be handed it."""
        request = self.http.build_request("GET", url)
        if not same_origin(request.url, self.http.base_url):
            request.headers.pop("Authorization", None)
        return request


class BlazeClient(_Options[httpx.Client]):
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
        body = _create_body(engine, input, model=model, webhook=webhook, webhook_events_filter=webhook_events_filter, **options)
        headers, timeout = _create_request(wait, self.timeout, idempotency_key)
        for attempt in range(self.submit_retries + 1):
            last = attempt == self.submit_retries
            try:
                response = self._send("POST", "/v1/jobs", json=body, headers=headers, timeout=timeout)
            except APIConnectionError:
                if last:
                    raise
            else:
                if last or response.status_code not in UNKNOWN_OUTCOME:
                    return self._json(response)
            time.sleep(SUBMIT_RETRY_PAUSE_S * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def get(self, job_id: str, *, wait: float | None = None) -> dict[str, Any]:
        """The job; with ``wait``, as soon as it ends or after ``wait`` seconds (long-poll)."""
        params = {"wait": wait} if wait else None
        return self._json(self._send("GET", f"/v1/jobs/{job_id}", params=params, timeout=self.timeout + (wait or 0)))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self._send("POST", f"/v1/jobs/{job_id}/cancel"))

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
            self._json(response)
        return response.content

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, url, **kwargs)
        except httpx.TransportError as error:
            raise unreachable(error) from error

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise problem_of(response)
        return response.json()

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
                        self._json(source.response)
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
        params = _list_params(status=status, engine=engine, limit=limit, cursor=cursor)
        return self._json(self._send("GET", "/v1/jobs", params=params))

    def workers(self) -> list[dict[str, Any]]:
        """The live workers (an admin key's view): engine, models, breaker, jobs held, last beat."""
        return self._json(self._send("GET", "/v1/workers"))["workers"]

    def queues(self) -> list[dict[str, Any]]:
        """Each engine's queue: its depth and the age of the job at its head."""
        return self._json(self._send("GET", "/v1/queues"))["queues"]

    def position(self, job_id: str) -> dict[str, Any]:
        """The job's place in its engine's queue (``position``: 1 is the next one taken)."""
        return self._json(self._send("GET", f"/v1/jobs/{job_id}/position"))

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """The job's webhook deliveries, each with its attempts."""
        return self._json(self._send("GET", f"/v1/jobs/{job_id}/deliveries"))["deliveries"]

    def redeliver(self, job_id: str, delivery_id: str) -> dict[str, Any]:
        """Send a delivery's event to the webhook again; returns the new delivery."""
        return self._json(self._send("POST", f"/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver"))

    def webhook_secret(self) -> str:
        """The ``whsec_`` secret the key's tenant signs webhooks with (``webhook_secret=`` if given)."""
        if self._secret is not None:
            return self._secret
        return (self._held.secrets or self._fetch_secrets())[0]

    def _fetch_secrets(self) -> list[str]:
        return self._held.hold(self._json(self._send("GET", "/v1/webhooks/secret")))

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


# --- shared by both clients ---------------------------------------------------------------


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event of a job's stream."""

    id: str | None
    event: str
    data: Any

    @property
    def final(self) -> bool:
        """The job's last event: it ended (``data`` is the final job)."""
        return self.event == "job.completed" or (self.event == "job" and self.data.get("status") in ENDED)

    @classmethod
    def of(cls, sse: httpx_sse.ServerSentEvent) -> ServerEvent | None:
        """The event httpx-sse read, its data parsed; None for a block with no data (the
        stream's ``retry:``), which the HTML standard's rules do not dispatch."""
        if not sse.data:
            return None
        return cls(id=sse.id or None, event=sse.event, data=json.loads(sse.data))


class SSEParser:
    """Server-sent events from lines of text a caller already has, read by httpx-sse's rules."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()

    def feed(self, line: str) -> ServerEvent | None:
        """Take one line (without its end); returns an event when a blank line completes one."""
        sse = self._decoder.decode(line)
        return ServerEvent.of(sse) if sse is not None else None


class LongPoll:
    """How long one long-poll of ``wait`` asks for: all the time left, until the server
    refuses that (a 422 naming ``wait`` and its bound, BLAZE_MAX_WAIT_S); then at most its bound."""

    def __init__(self) -> None:
        self.bound: float | None = None

    def length(self, left: float) -> float:
        return max(0.0, left if self.bound is None else min(left, self.bound))

    def refused(self, error: APIError, asked: float) -> bool:
        """Whether ``error`` refused a wait of ``asked`` seconds as too long; then the bound
        it names (or, naming none, half of ``asked``) is the one asked for from now on."""
        if error.status != 422 or not asked:
            return False
        said = [str(e.get("message", "")) for e in error.errors if e.get("field") == "wait"]
        if not said:
            return False
        number = re.search(r"\d+(?:\.\d+)?", said[0])
        bound = float(number.group()) if number else asked / 2
        # A bound no lower than what was refused is no bound: ask for less, down to no wait.
        self.bound = bound if bound < asked else asked / 2 if asked > 1 else 0.0
        return True


def problem_of(response: httpx.Response) -> APIError:
    """The APIError of an error answer: its problem when the body is one (or at least a JSON
    object), else the start of the body, whatever it is (a proxy's HTML, a plain-text 500)."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        error = APIError(response.status_code, problem)
        if response.status_code == 401:
            # The one refusal the caller fixes in its own set-up: say where a key goes.
            hint = "set BLAZE_API_KEY, or pass api_key= (blaze: --api-key); `blaze keys create` makes a key"
            error.args = (f"{error}; {hint}",)
        return error
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    text = " ".join(response.text.split())
    start = f"{kind} body: {text[:300]}" if text else f"empty {kind} body"
    return APIError(response.status_code, {"title": response.reason_phrase}, body=start)


def unreachable(error: httpx.TransportError) -> APIConnectionError:
    """``error`` as the client raises it: naming the URL it could not reach."""
    try:
        where = f"{error.request.method} {error.request.url}"
    except RuntimeError:  # an error raised before a request was built
        where = "the API"
    return APIConnectionError(f"cannot reach the API: {where}: {type(error).__name__}: {error}")


def _create_body(
    engine: str,
    input: dict[str, Any],
    *,
    model: str | None,
    webhook: str | None,
    webhook_events_filter: Iterable[str] | None,
    **options: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"engine": engine, "input": input, **options}
    if model:
        body["model"] = model
    if webhook:
        body["webhook"] = webhook
    if webhook_events_filter is not None:
        body["webhook_events_filter"] = list(webhook_events_filter)
    return body


def _list_params(*, status: str | None, engine: str | None, limit: int | None, cursor: str | None) -> dict[str, Any]:
    """The query of ``GET /v1/jobs``: the filters given, and no others."""
    given = {"status": status, "engine": engine, "limit": limit, "cursor": cursor}
    return {name: value for name, value in given.items() if value is not None}


DEFAULT_PORTS = {"http": 80, "https": 443}


def same_origin(url: httpx.URL, base: httpx.URL) -> bool:
    """Whether ``url`` has ``base``'s scheme, host and port (a default port written or not)."""

    def origin(u: httpx.URL) -> tuple[str, str, int | None]:
        return u.scheme, u.host.lower(), u.port or DEFAULT_PORTS.get(u.scheme)

    return origin(url) == origin(base)


def _create_request(wait: float | None, timeout: float, idempotency_key: str | None) -> tuple[dict[str, str], float]:
    """Headers and HTTP timeout of a create: its ``Idempotency-Key`` (a fresh uuid4 unless
    given), and ``Prefer: wait=N`` for one that waits."""
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    if not wait:
        return headers, timeout
    return {**headers, "Prefer": f"wait={wait:g}"}, timeout + wait


class AsyncBlazeClient(_Options[httpx.AsyncClient]):
    """``BlazeClient`` for asyncio: the same methods, awaited (``events`` is an async iterator)."""

    def _open(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, headers=self.headers)

    async def __aenter__(self) -> AsyncBlazeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def submit(
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
        body = _create_body(engine, input, model=model, webhook=webhook, webhook_events_filter=webhook_events_filter, **options)
        headers, timeout = _create_request(wait, self.timeout, idempotency_key)
        for attempt in range(self.submit_retries + 1):
            last = attempt == self.submit_retries
            try:
                response = await self._send("POST", "/v1/jobs", json=body, headers=headers, timeout=timeout)
            except APIConnectionError:
                if last:
                    raise
            else:
                if last or response.status_code not in UNKNOWN_OUTCOME:
                    return BlazeClient._json(response)
            await asyncio.sleep(SUBMIT_RETRY_PAUSE_S * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def get(self, job_id: str, *, wait: float | None = None) -> dict[str, Any]:
        params = {"wait": wait} if wait else None
        return BlazeClient._json(await self._send("GET", f"/v1/jobs/{job_id}", params=params, timeout=self.timeout + (wait or 0)))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return BlazeClient._json(await self._send("POST", f"/v1/jobs/{job_id}/cancel"))

    async def wait(self, job_id: str, *, timeout: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            asked = self._long_poll.length(left)
            try:
                job = await self.get(job_id, wait=asked)
            except APIError as error:
                if self._long_poll.refused(error, asked):
                    continue
                if error.status != 503 or left <= 0:
                    raise
                await asyncio.sleep(min(1.0, max(left, 0)))
                continue
            except APIConnectionError:
                if left <= 0:
                    raise
                await asyncio.sleep(min(1.0, max(left, 0)))
                continue
            if job["status"] in ENDED:
                return job
            if time.monotonic() >= deadline:
                raise WaitTimeout(job_id, job, timeout)
            if not asked:
                await asyncio.sleep(min(self.poll_s, max(deadline - time.monotonic(), 0)))

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.http.request(method, url, **kwargs)
        except httpx.TransportError as error:
            raise unreachable(error) from error

    async def events(self, job_id: str, *, last_event_id: str | None = None) -> AsyncIterator[ServerEvent]:
        last, failures = last_event_id, 0
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            timeout = httpx.Timeout(self.timeout, read=self.stream_read_timeout_s)
            try:
                url = f"/v1/jobs/{job_id}/events"
                async with httpx_sse.aconnect_sse(self.http, "GET", url, headers=headers, timeout=timeout) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        BlazeClient._json(source.response)
                    async for sse in source.aiter_sse():
                        event = ServerEvent.of(sse)
                        if event is None:
                            continue
                        last, failures = event.id or last, 0
                        yield event
                        if event.final:
                            return
                return
            except httpx.TransportError as error:
                failures += 1
                if failures > self.stream_reconnects:
                    raise unreachable(error) from error
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))

    stream = events

    async def list_jobs(
        self, *, status: str | None = None, engine: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        params = _list_params(status=status, engine=engine, limit=limit, cursor=cursor)
        return BlazeClient._json(await self._send("GET", "/v1/jobs", params=params))

    async def workers(self) -> list[dict[str, Any]]:
        return BlazeClient._json(await self._send("GET", "/v1/workers"))["workers"]

    async def queues(self) -> list[dict[str, Any]]:
        return BlazeClient._json(await self._send("GET", "/v1/queues"))["queues"]

    async def position(self, job_id: str) -> dict[str, Any]:
        return BlazeClient._json(await self._send("GET", f"/v1/jobs/{job_id}/position"))

    async def download(self, url: str) -> bytes:
        request = self._download_request(url)
        try:
            response = await self.http.send(request)
        except httpx.TransportError as error:
            raise unreachable(error) from error
        if response.status_code != 200:
            BlazeClient._json(response)
        return response.content

    async def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        return BlazeClient._json(await self._send("GET", f"/v1/jobs/{job_id}/deliveries"))["deliveries"]

    async def redeliver(self, job_id: str, delivery_id: str) -> dict[str, Any]:
        return BlazeClient._json(await self._send("POST", f"/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver"))

    async def webhook_secret(self) -> str:
        if self._secret is not None:
            return self._secret
        return (self._held.secrets or await self._fetch_secrets())[0]

    async def _fetch_secrets(self) -> list[str]:
        return self._held.hold(BlazeClient._json(await self._send("GET", "/v1/webhooks/secret")))

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes | str) -> dict[str, Any]:
        if self._secret is not None:
            return verify(self._secret, headers, body)
        try:
            return verify(self._held.secrets or await self._fetch_secrets(), headers, body)
        except WebhookVerificationError:
            if not self._held.stale:
                raise
            return verify(await self._fetch_secrets(), headers, body)
