"""The webhook signing secret goes only to a caller with the admin token: never to a caller
for where it appears to be, since a forwarded header can claim any address."""

from __future__ import annotations

import httpx
import pytest

from blaze_jobs.stack import Stack
from tests.conftest import start_api

pytestmark = pytest.mark.timeout(90)


def test_with_no_admin_token_nobody_gets_the_secret_not_even_loopback(own_stack: Stack) -> None:
    # Given a real API with no admin token, reached from its own host
    api_url = start_api(own_stack, BLAZE_ADMIN_TOKEN="")

    # When a caller asks for the secret, plainly or claiming to be forwarded from loopback
    plain = httpx.get(f"{api_url}/v1/webhooks/secret", timeout=10)
    forwarded = httpx.get(f"{api_url}/v1/webhooks/secret", headers={"X-Forwarded-For": "127.0.0.1"}, timeout=10)

    # Then both are refused, and the answer says how to configure it
    for answer in (plain, forwarded):
        assert answer.status_code == 403, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert "BLAZE_ADMIN_TOKEN" in answer.json()["detail"] and "secret" not in answer.json()


def test_the_secret_needs_the_admin_token_as_a_bearer(own_stack: Stack) -> None:
    # Given a real API with an admin token
    api_url = start_api(own_stack, BLAZE_ADMIN_TOKEN="s3cret-admin")
    url = f"{api_url}/v1/webhooks/secret"

    # When callers ask without it, with another, or with it but not as a bearer
    refused = [
        httpx.get(url, headers=headers, timeout=10)
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret-admin"},
            {"X-Forwarded-For": "127.0.0.1"},
        )
    ]
    granted = httpx.get(url, headers={"Authorization": "Bearer s3cret-admin"}, timeout=10)

    # Then only the bearer of the token gets the secret; the others learn how to send it
    for answer in refused:
        assert answer.status_code == 401, answer.text
        assert answer.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in answer.json()["detail"]
    assert granted.status_code == 200 and granted.json()["secret"].startswith("whsec_")
