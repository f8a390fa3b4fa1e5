"""``AsyncBlazeClient``: ``BlazeClient`` (``client.py``) for asyncio, the same methods awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import httpx
import httpx_sse

from blaze_jobs.client_wire import (
    ENDED,
    SUBMIT_RETRY_PAUSE_S,
    UNKNOWN_OUTCOME,
    ClientOptions,
    ServerEvent,
    create_body,
    create_request,
    json_of,
    list_params,
    unreachable,
)
from blaze_jobs.errors import APIConnectionError, APIError, WaitTimeout
from blaze_jobs.signing import WebhookVerificationError, verify


class AsyncBlazeClient(ClientOptions[httpx.AsyncClient]):
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
        body = create_body(engine, input, model=model, webhook=webhook, webhook_events_filter=webhook_events_filter, **options)
        headers, timeout = create_request(wait, self.timeout, idempotency_key)
        for attempt in range(self.submit_retries + 1):
            last = attempt == self.submit_retries
            try:
                response = await self._send("POST", "/v1/jobs", json=body, headers=headers, timeout=timeout)
            except APIConnectionError:
                if last:
                    raise
            else:
                if last or response.status_code not in UNKNOWN_OUTCOME:
                    return json_of(response)
            await asyncio.sleep(SUBMIT_RETRY_PAUSE_S * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def get(self, job_id: str, *, wait: float | None = None) -> dict[str, Any]:
        params = {"wait": wait} if wait else None
        return json_of(await self._send("GET", f"/v1/jobs/{job_id}", params=params, timeout=self.timeout + (wait or 0)))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return json_of(await self._send("POST", f"/v1/jobs/{job_id}/cancel"))

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
                        json_of(source.response)
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
        params = list_params(status=status, engine=engine, limit=limit, cursor=cursor)
        return json_of(await self._send("GET", "/v1/jobs", params=params))

    async def workers(self) -> list[dict[str, Any]]:
        return json_of(await self._send("GET", "/v1/workers"))["workers"]

    async def queues(self) -> list[dict[str, Any]]:
        return json_of(await self._send("GET", "/v1/queues"))["queues"]

    async def position(self, job_id: str) -> dict[str, Any]:
        return json_of(await self._send("GET", f"/v1/jobs/{job_id}/position"))

    async def download(self, url: str) -> bytes:
        request = self._download_request(url)
        try:
            response = await self.http.send(request)
        except httpx.TransportError as error:
            raise unreachable(error) from error
        if response.status_code != 200:
            json_of(response)
        return response.content

    async def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        return json_of(await self._send("GET", f"/v1/jobs/{job_id}/deliveries"))["deliveries"]

    async def redeliver(self, job_id: str, delivery_id: str) -> dict[str, Any]:
        return json_of(await self._send("POST", f"/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver"))

    async def webhook_secret(self) -> str:
        if self._secret is not None:
            return self._secret
        return (self._held.secrets or await self._fetch_secrets())[0]

    async def _fetch_secrets(self) -> list[str]:
        return self._held.hold(json_of(await self._send("GET", "/v1/webhooks/secret")))

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes | str) -> dict[str, Any]:
        if self._secret is not None:
            return verify(self._secret, headers, body)
        try:
            return verify(self._held.secrets or await self._fetch_secrets(), headers, body)
        except WebhookVerificationError:
            if not self._held.stale:
                raise
            return verify(await self._fetch_secrets(), headers, body)
