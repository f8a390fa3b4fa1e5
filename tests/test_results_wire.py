"""What the libraries that carry results do for us, held to what we promise: the event
stream's keep-alives come as configured (sse-starlette), the client gives up a dead stream
after its reconnects (httpx-sse), and webhook verification refuses malformed headers with
our error, which is also the Standard Webhooks library's."""

from __future__ import annotations

import time

import httpx
import pytest
import standardwebhooks

from blaze_jobs import signing
from blaze_jobs.client import BlazeClient
from blaze_jobs.errors import APIConnectionError, BlazeError
from blaze_jobs.stack import Stack, free_port
from tests.conftest import AUTH, start_api

pytestmark = pytest.mark.timeout(120)


def test_an_idle_event_stream_sends_keep_alives_at_the_configured_interval(own_stack: Stack) -> None:
    # Given an API that keeps streams alive every 0.3 s, and a job no worker runs
    api_url = start_api(own_stack, BLAZE_EVENT_KEEP_ALIVE_S="0.3")
    with httpx.Client(base_url=api_url, timeout=30, headers=AUTH) as http:
        job = http.post("/v1/jobs", json={"engine": "echo", "input": {"n": 1}}).json()

        # When a client follows its events for a while
        lines: list[str] = []
        started = time.monotonic()
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            assert response.status_code == 200 and response.headers["cache-control"] == "no-cache"
            for line in response.iter_lines():
                lines.append(line)
                if lines.count(": keep-alive") >= 2:
                    break
        took = time.monotonic() - started

    # Then after the job as it stands come keep-alive comments, well before the default 15 s
    assert lines[:2] == ["retry: 1000", ""], lines
    assert lines[2].startswith("id: ") and lines[3] == "event: job", lines
    assert took < 10, (took, lines)


def test_a_dead_event_stream_is_given_up_after_the_clients_reconnects() -> None:
    # Given nothing listening where the client looks, and a client that reconnects once
    url = f"http://127.0.0.1:{free_port()}"
    with BlazeClient(url, stream_reconnects=1) as client:
        # When it follows a job's events, Then it names the URL it could not reach, after
        # one pause (0.2 s) rather than the five of the default
        started = time.monotonic()
        with pytest.raises(APIConnectionError, match="/v1/jobs/j1/events"):
            list(client.events("j1"))
        assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "signature",
    ["v1", "v1,not base64!", "v1,a,b", ""],
    ids=["no comma", "not base64", "two commas", "empty"],
)
def test_a_malformed_signature_fails_verification_with_our_error(signature: str) -> None:
    secret = signing.new_secret()
    headers = {**signing.signed_headers(secret, msg_id="msg_1", body=b"{}"), "webhook-signature": signature}
    with pytest.raises(signing.WebhookVerificationError) as refused:
        signing.verify(secret, headers, b"{}")
    # (a receiver may catch ours, Blaze's base error, or the reference library's)
    assert isinstance(refused.value, BlazeError) and isinstance(refused.value, standardwebhooks.WebhookVerificationError)


def test_a_signed_body_that_is_no_utf8_fails_verification() -> None:
    secret = signing.new_secret()
    headers = signing.signed_headers(secret, msg_id="msg_1", body=b"{}")
    with pytest.raises(signing.WebhookVerificationError):
        signing.verify(secret, headers, b"\xff\xfe")
