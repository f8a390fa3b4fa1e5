"""What both Python clients (``client.py``, ``client_async.py``) hold and share: their options
and HTTP client, the bodies and headers they send, and how they read what the API answers
(server-sent events, long-poll bounds, problem answers)."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
import httpx_sse

# httpx-sse reads a response's events with this decoder; SSEParser offers the same rules for
# lines a caller already has (httpx-sse exports no decoder of its own).
from httpx_sse._decoders import SSEDecoder

from blaze_jobs.errors import APIConnectionError, APIError
from blaze_jobs.signing import HeldSecrets

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


class ClientOptions(Generic[HTTP]):
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


def create_body(
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


def list_params(*, status: str | None, engine: str | None, limit: int | None, cursor: str | None) -> dict[str, Any]:
    """The query of ``GET /v1/jobs``: the filters given, and no others."""
    given = {"status": status, "engine": engine, "limit": limit, "cursor": cursor}
    return {name: value for name, value in given.items() if value is not None}


DEFAULT_PORTS = {"http": 80, "https": 443}


def same_origin(url: httpx.URL, base: httpx.URL) -> bool:
    """Whether ``url`` has ``base``'s scheme, host and port (a default port written or not)."""

    def origin(u: httpx.URL) -> tuple[str, str, int | None]:
        return u.scheme, u.host.lower(), u.port or DEFAULT_PORTS.get(u.scheme)

    return origin(url) == origin(base)


def create_request(wait: float | None, timeout: float, idempotency_key: str | None) -> tuple[dict[str, str], float]:
    """Headers and HTTP timeout of a create: its ``Idempotency-Key`` (a fresh uuid4 unless
    given), and ``Prefer: wait=N`` for one that waits."""
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    if not wait:
        return headers, timeout
    return {**headers, "Prefer": f"wait={wait:g}"}, timeout + wait


def json_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a good answer; the APIError of an error answer."""
    if response.status_code >= 400:
        raise problem_of(response)
    return response.json()
