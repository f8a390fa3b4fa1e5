"""The Python clients as a user holds them: submit, wait (long-poll), follow events, cancel,
download, and verify the webhooks a receiver gets."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from blaze_jobs.client import AsyncBlazeClient, BlazeClient, SSEParser
from blaze_jobs.errors import APIConnectionError, APIError, BlazeError, WaitTimeout
from blaze_jobs.settings import Settings
from blaze_jobs.signing import WebhookVerificationError, new_secret
from blaze_jobs.stack import Stack, free_port
from tests.conftest import ADMIN_TOKEN, start_api, wait_for_workers
from tests.receiver import Receiver

# Generous: the first test to use the stack also waits for it to start.
pytestmark = pytest.mark.timeout(180)


def test_the_client_follows_a_job_from_submit_to_image(stack: dict[str, Any]) -> None:
    with BlazeClient(stack["api_url"]) as client:
        # Given an image job
        job = client.submit("diffusion", {"prompt": "a fox", "num_inference_steps": 8, "seed": 11})

        # When the client follows its events to the end
        events = list(client.events(job["id"]))

        # Then it saw the job start and end, and the image it downloads is the one reported
        assert events[0].event == "job"
        kinds = [e.event for e in events]
        # a job first seen queued is then seen starting; one first seen later had started
        assert "job.started" in kinds if events[0].data["status"] == "queued" else events[0].data["started_at"]
        final = events[-1]
        assert final.final and final.data["status"] == "succeeded"
        image = final.data["output"]["images"][0]
        data = client.download(image["url"])
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and hashlib.sha256(data).hexdigest() == image["sha256"]
        # and waiting on an ended job answers at once
        assert client.wait(job["id"], timeout=5) == final.data


def answers_by_status(client: BlazeClient | AsyncBlazeClient) -> Counter[int]:
    """The HTTP statuses of every answer the client gets from now on, counted (httpx's own
    event hooks)."""
    seen: Counter[int] = Counter()

    def count(response: httpx.Response) -> None:
        seen[response.status_code] += 1

    async def count_async(response: httpx.Response) -> None:
        count(response)

    client.http.event_hooks["response"].append(count_async if isinstance(client, AsyncBlazeClient) else count)
    return seen


def test_wait_long_polls_and_submit_can_wait(stack: dict[str, Any]) -> None:
    with BlazeClient(stack["api_url"]) as client:
        # Given a job that takes 0.6 s
        job = client.submit("echo", {"sleep_ms": 600})
        answers = answers_by_status(client)

        # When the client waits for it
        ended = client.wait(job["id"], timeout=30)

        # Then it got the ended job from one long-poll (a refused first ask aside, while the
        # client learns how long the server lets a long-poll last): no polling loop
        assert ended["status"] == "succeeded"
        assert answers[200] == 1 and answers[422] <= 1, answers
        assert client.submit("echo", {"sleep_ms": 100}, wait=5)["status"] == "succeeded"

        # and a wait that runs out raises a TimeoutError that carries the job as last seen
        slow = client.submit("echo", {"sleep_ms": 5000})
        with pytest.raises(WaitTimeout) as timed_out:
            client.wait(slow["id"], timeout=0.3)
        assert isinstance(timed_out.value, TimeoutError) and isinstance(timed_out.value, BlazeError)
        assert timed_out.value.job_id == slow["id"] and slow["id"] in str(timed_out.value)
        assert timed_out.value.job["id"] == slow["id"] and timed_out.value.job["status"] in ("queued", "running")


@pytest.mark.timeout(120)
def test_wait_learns_how_long_the_server_lets_a_long_poll_last(own_stack: Stack) -> None:
    # Given an API that holds a long-poll at most 1 s, and a job that takes 3 s
    api_url = start_api(own_stack, BLAZE_MAX_WAIT_S="1")
    own_stack.blaze("echo", "worker", "--engine", "echo", "--concurrency", "2")
    wait_for_workers(api_url, 1)
    with BlazeClient(api_url) as client:
        answers = answers_by_status(client)
        jobs = [client.submit("echo", {"sleep_ms": 3000, "n": n}) for n in range(2)]

        # When the client waits for each, longer than that
        started = time.monotonic()
        ended = [client.wait(job["id"], timeout=60) for job in jobs]
        waited = time.monotonic() - started

        # Then each ended (the server's refusal of a longer wait taught the client its bound,
        # once), polled in long-polls of that bound rather than in a loop: each answer but
        # the two that brought an ended job held for the bound
        assert [job["status"] for job in ended] == ["succeeded", "succeeded"]
        assert answers[422] == 1, answers
        assert 3 <= answers[200] <= waited / 1 + 2, (answers, waited)


def test_the_async_client_learns_the_bound_too(stack: dict[str, Any], settings: Settings) -> None:
    async def story() -> None:
        async with AsyncBlazeClient(stack["api_url"]) as client:
            # Given the stack's API, which holds a long-poll at most BLAZE_MAX_WAIT_S
            answers = answers_by_status(client)
            job = await client.submit("echo", {"sleep_ms": 300})

            # When the client waits longer than that, twice
            longer = settings.max_wait_s + 60
            assert (await client.wait(job["id"], timeout=longer))["status"] == "succeeded"
            assert (await client.wait(job["id"], timeout=longer))["status"] == "succeeded"

            # Then the server refused the first long ask only
            assert answers[422] == 1 and answers[200] == 2, answers

    asyncio.run(story())


class LocalServer:
    """A real HTTP server on 127.0.0.1, in a thread of the test, serving ``handler``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BrokenServer(LocalServer):
    """A real HTTP server on 127.0.0.1 that answers every request with one status, content
    type and body, as a failing proxy or a crashed app does."""

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        #: The headers of every request it got, in order.
        self.seen: list[dict[str, str]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                seen.append({name.lower(): value for name, value in self.headers.items()})
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler)


@pytest.fixture()
def broken() -> Iterator[Callable[[int, str, bytes], str]]:
    servers: list[BrokenServer] = []

    def start(status: int, content_type: str, body: bytes) -> str:
        servers.append(BrokenServer(status, content_type, body))
        return servers[-1].url

    yield start
    for server in servers:
        server.close()


def test_an_api_that_does_not_answer_raises_a_connection_error_naming_its_url() -> None:
    # Given an address where nothing listens
    url = f"http://127.0.0.1:{free_port()}"
    with BlazeClient(url, timeout=2) as client:
        # When the client submits, Then it raises a Blaze error (a ConnectionError) naming the URL
        with pytest.raises(APIConnectionError) as refused:
            client.submit("echo", {})
        assert isinstance(refused.value, BlazeError) and isinstance(refused.value, ConnectionError)
        assert f"POST {url}/v1/jobs" in str(refused.value)
        # and waiting on a job there ends with the same error once its time is up
        with pytest.raises(APIConnectionError, match=url):
            client.wait("some-job", timeout=0.5)

    async def story() -> None:
        async with AsyncBlazeClient(url, timeout=2) as client:
            with pytest.raises(APIConnectionError, match=f"GET {url}/v1/jobs/some-job"):
                await client.get("some-job")

    asyncio.run(story())


def test_an_error_answer_carries_its_problem_or_the_start_of_its_body(stack: dict[str, Any], broken: Any) -> None:
    with BlazeClient(stack["api_url"]) as client:
        # A problem from the API: its status, title, detail, id and the faulty fields
        with pytest.raises(APIError) as missing:
            client.get("no-such-job")
        assert (missing.value.status, missing.value.title) == (404, "Job not found")
        assert "no-such-job" in missing.value.detail and missing.value.problem_id
        assert str(missing.value) == f"HTTP 404: Job not found: {missing.value.detail} (problem id {missing.value.problem_id})"
        with pytest.raises(APIError) as invalid:
            client.submit("echo", {"sleep_ms": -1})
        assert invalid.value.status == 422 and [e["field"] for e in invalid.value.errors] == ["input.sleep_ms"]

    # A 500 whose body is plain text (a crashed app), and a proxy's HTML error page
    with BlazeClient(broken(500, "text/plain; charset=utf-8", b"Internal Server Error")) as client:
        with pytest.raises(APIError) as crashed:
            client.submit("echo", {})
    assert crashed.value.status == 500 and crashed.value.body == "text/plain body: Internal Server Error"
    assert str(crashed.value) == "HTTP 500: Internal Server Error: text/plain body: Internal Server Error"
    page = b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body>\n</html>\n" + b" " * 2000

    async def story() -> None:
        async with AsyncBlazeClient(broken(502, "text/html", page)) as client:
            with pytest.raises(APIError) as proxied:
                await client.get("some-job")
        assert proxied.value.status == 502 and proxied.value.title == "Bad Gateway"
        assert proxied.value.body.startswith("text/html body: <html> <head><title>502 Bad Gateway</title>")
        assert len(proxied.value.body) < 400

    asyncio.run(story())
    # and a problem from something else that speaks problem+json, with its id
    problem = b'{"type": "about:blank", "title": "Internal error", "status": 500, "detail": "boom", "id": "p-1"}'
    with BlazeClient(broken(500, "application/problem+json", problem)) as client:
        with pytest.raises(APIError, match=r"^HTTP 500: Internal error: boom \(problem id p-1\)$") as failed:
            client.cancel("some-job")
    assert (failed.value.title, failed.value.detail, failed.value.problem_id) == ("Internal error", "boom", "p-1")


def test_the_async_client_does_the_same(stack: dict[str, Any]) -> None:
    async def story() -> None:
        async with AsyncBlazeClient(stack["api_url"], admin_token=ADMIN_TOKEN) as client:
            # Two jobs followed at once: one by its events, one by long-poll
            first = await client.submit("echo", {"sleep_ms": 300, "tag": "a"})
            second = await client.submit("echo", {"sleep_ms": 300, "tag": "b"})

            async def follow(job_id: str) -> list[Any]:
                return [event async for event in client.events(job_id)]

            events, waited = await asyncio.gather(follow(first["id"]), client.wait(second["id"], timeout=30))
            assert events[-1].final and events[-1].data["output"]["tag"] == "a"
            assert waited["status"] == "succeeded" and waited["output"]["tag"] == "b"
            assert (await client.get(first["id"], wait=1)) == events[-1].data

            # and a running job is canceled
            long = await client.submit("echo", {"sleep_ms": 10_000})
            assert (await client.cancel(long["id"]))["status"] == "canceled"
            assert (await client.wait(long["id"], timeout=5))["status"] == "canceled"
            assert (await client.webhook_secret()).startswith("whsec_")

    asyncio.run(story())


def test_a_receiver_verifies_webhooks_with_the_client(stack: dict[str, Any]) -> None:
    receiver = Receiver()
    hook = f"/hook/{uuid.uuid4().hex[:8]}"
    try:
        with BlazeClient(stack["api_url"], admin_token=ADMIN_TOKEN) as client:
            # Given a job whose webhook reaches a receiver
            job = client.submit("echo", {"n": 1}, webhook=receiver.url(hook), webhook_events_filter=["completed"])
            (request,) = receiver.wait_for(hook, 1, timeout=10)

            # When the receiver verifies it, Then it gets the event
            event = client.verify_webhook(request.headers, request.body)
            assert event["type"] == "job.completed" and event["data"]["id"] == job["id"]
            # but a changed body, or another deployment's secret, fails
            with pytest.raises(WebhookVerificationError):
                client.verify_webhook(request.headers, request.body.replace(b'"n":1', b'"n":2'))
            with BlazeClient(stack["api_url"], webhook_secret=new_secret()) as stranger:
                with pytest.raises(WebhookVerificationError):
                    stranger.verify_webhook(request.headers, request.body)
    finally:
        receiver.close()


def test_the_event_parser_follows_the_sse_rules() -> None:
    parser = SSEParser()
    lines = [
        "retry: 1000",
        "",
        ": keep-alive",
        "",
        "id: 5-0",
        "event: job.progress",
        'data: {"step": 1,',
        'data: "total": 2}',
        "",
    ]
    events = [e for e in (parser.feed(line) for line in lines) if e]
    assert [(e.id, e.event, e.data) for e in events] == [("5-0", "job.progress", {"step": 1, "total": 2})]


class LosingProxy(LocalServer):
    """A real HTTP proxy in front of the API that forwards every request, but drops the
    connection instead of passing on the first create's answer: the job was made, and the
    client cannot know it. It records each create's ``Idempotency-Key`` and the API's answer."""

    def __init__(self, api_url: str) -> None:
        self.creates: list[tuple[str | None, int, dict[str, Any]]] = []
        creates = self.creates

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.post(f"{api_url}{self.path}", content=body, headers=headers, timeout=30)
                creates.append((self.headers.get("idempotency-key"), answer.status_code, answer.json()))
                if len(creates) == 1:
                    self.close_connection = True  # the answer is lost on the way back
                    return
                self.send_response(answer.status_code)
                for name in ("content-type", "content-length", "location"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler)


def test_a_submit_whose_answer_is_lost_is_retried_into_the_same_job(stack: dict[str, Any]) -> None:
    # Given a proxy that loses the API's answer to the first create
    proxy = LosingProxy(stack["api_url"])
    try:
        with BlazeClient(proxy.url) as client:
            # When the client submits a job through it
            job = client.submit("echo", {"tag": uuid.uuid4().hex})
    finally:
        proxy.close()

    # Then the client sent the create again with the same Idempotency-Key, and the API
    # answered the job the first create made: one job, not two
    (first_key, first_status, first), (second_key, second_status, second) = proxy.creates
    assert first_key and first_key == second_key
    assert (first_status, second_status) == (202, 200), proxy.creates
    assert job["id"] == first["id"] == second["id"]


UNKNOWN_OUTCOMES = {
    # a proxy lost the API's answer: the job perhaps made
    502: ("text/html", b"<html>502 Bad Gateway</html>"),
    # the API is still making the job of an earlier try with the same key
    409: ("application/problem+json", b'{"title": "Conflict", "status": 409, "detail": "still being processed"}'),
}


@pytest.mark.parametrize("status", sorted(UNKNOWN_OUTCOMES))
def test_every_retry_of_one_submit_carries_its_key(status: int) -> None:
    # Given a server that answers every create so that the client cannot tell whether its job was made
    server = BrokenServer(status, *UNKNOWN_OUTCOMES[status])
    try:
        with BlazeClient(server.url, submit_retries=2) as client:
            # When a job is submitted, twice
            for _ in range(2):
                with pytest.raises(APIError) as failed:
                    client.submit("echo", {"n": 1})
                assert failed.value.status == status
            # and once with a key of the caller's own
            with pytest.raises(APIError):
                client.submit("echo", {"n": 1}, idempotency_key="order-42")

        # and once by the async client
        async def story() -> None:
            async with AsyncBlazeClient(server.url, submit_retries=2) as async_client:
                with pytest.raises(APIError):
                    await async_client.submit("echo", {"n": 1})

        asyncio.run(story())
    finally:
        server.close()

    # Then each submit was tried three times, always with its own one key
    keys = [seen.get("idempotency-key") for seen in server.seen]
    assert len(keys) == 12 and all(keys)
    assert len(set(keys[:3])) == len(set(keys[3:6])) == len(set(keys[9:])) == 1
    assert len({keys[0], keys[3], keys[9]}) == 3
    assert keys[6:9] == ["order-42"] * 3


def test_a_missing_or_unknown_key_says_how_to_send_one(stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Given no BLAZE_API_KEY in the environment
    monkeypatch.delenv("BLAZE_API_KEY")
    for client in (BlazeClient(stack["api_url"]), BlazeClient(stack["api_url"], api_key="bz_live_not-a-key")):
        with client:
            # When a client without a key, or with an unknown one, submits
            with pytest.raises(APIError) as refused:
                client.submit("echo", {"n": 1})
        # Then it is a 401 whose message says where a key goes
        assert refused.value.status == 401
        assert "BLAZE_API_KEY" in str(refused.value) and "api_key=" in str(refused.value)


def test_download_sends_the_key_to_the_api_only() -> None:
    # Given an API and another server (a CDN, a store: another port on the same host) that
    # both serve artifacts, and a client of the API with a key
    api = BrokenServer(200, "image/png", b"\x89PNG api")
    elsewhere = BrokenServer(200, "image/png", b"\x89PNG elsewhere")
    key = "bz_live_never-leaves-the-api"
    signed = f"{elsewhere.url}/v1/artifacts/{'a' * 64}.png?expires=1&signature=s"
    try:
        with BlazeClient(api.url, api_key=key) as client:
            # When it downloads an artifact by the API's path, by its absolute URL, and by a
            # signed URL elsewhere
            assert client.download(f"/v1/artifacts/{'a' * 64}.png") == b"\x89PNG api"
            assert client.download(f"{api.url}/v1/artifacts/{'a' * 64}.png") == b"\x89PNG api"
            assert client.download(signed) == b"\x89PNG elsewhere"

        # and the async client does the same
        async def story() -> None:
            async with AsyncBlazeClient(api.url, api_key=key) as async_client:
                assert await async_client.download(f"{api.url}/v1/artifacts/{'a' * 64}.png") == b"\x89PNG api"
                assert await async_client.download(signed) == b"\x89PNG elsewhere"

        asyncio.run(story())
    finally:
        api.close()
        elsewhere.close()

    # Then the API got the key every time, and the other server never
    assert [seen.get("authorization") for seen in api.seen] == [f"Bearer {key}"] * 3
    assert [seen.get("authorization") for seen in elsewhere.seen] == [None, None]
