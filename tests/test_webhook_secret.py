"""Webhooks per tenant: each tenant's deliveries are signed with its own secret, which only
a key of that tenant reads (never anyone for where they appear to call from), and a job's
deliveries are seen and sent again only by its tenant."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
from standardwebhooks import Webhook, WebhookVerificationError

from blaze_jobs import signing
from blaze_jobs.api_keys import create_key
from blaze_jobs.client import BlazeClient
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from tests.conftest import AUTH, REDIS_URL, own_prefix, start_api
from tests.receiver import Receiver, path

pytestmark = pytest.mark.timeout(180)


@dataclass(frozen=True)
class Deployment:
    """An API, an echo worker and a webhook worker of a test's own."""

    stack: Stack
    url: str

    def key(self, tenant: str) -> dict[str, str]:
        """The headers of a new API key of ``tenant``."""
        env = self.stack.env
        client = redis.Redis.from_url(env["BLAZE_REDIS_URL"])
        try:
            secret, _ = create_key(
                client,
                Settings(redis_url=env["BLAZE_REDIS_URL"], redis_prefix=env["BLAZE_REDIS_PREFIX"]),
                tenant=tenant,
                name="test",
            )
        finally:
            client.close()
        return {"Authorization": f"Bearer {secret}"}

    def secrets(self, key: dict[str, str]) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/v1/webhooks/secret", headers=key, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def hooked_job(self, key: dict[str, str], receiver: Receiver) -> tuple[str, str]:
        """Create an echo job whose completion goes to ``receiver``: its id and the hook's path."""
        hook = path()
        body = {"engine": "echo", "input": {"n": 1}, "webhook": receiver.url(hook), "webhook_events_filter": ["completed"]}
        answer = httpx.post(f"{self.url}/v1/jobs", json=body, headers=key, timeout=10)
        assert answer.status_code == 202, answer.text
        return answer.json()["id"], hook


def deploy(stack: Stack, **env: str) -> Deployment:
    """Start the API (with ``env``) and the two workers a webhook needs, in ``stack``."""
    stack.blaze("worker-echo", "worker", "--engine", "echo", **env)
    stack.blaze("worker-webhooks", "worker", "--engine", "webhooks", **env)
    return Deployment(stack, start_api(stack, **env))


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def test_each_tenant_reads_its_own_secret_with_its_key_and_nobody_without_one(own_stack: Stack) -> None:
    # Given a deployment with keys of two tenants
    api = deploy(own_stack)
    acme, globex = api.key(tenant()), api.key(tenant())
    url = f"{api.url}/v1/webhooks/secret"

    # When callers without a key, with an unknown one, or claiming loopback ask for the secret
    refused = [
        httpx.get(url, headers=headers, timeout=10)
        for headers in ({}, {"Authorization": "Bearer bz_live_unknown"}, {"X-Forwarded-For": "127.0.0.1"})
    ]

    # Then each is refused, and learns how to send a key
    for answer in refused:
        assert answer.status_code == 401, answer.text
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.headers["content-type"] == "application/problem+json"
        assert "secret" not in answer.json()

    # And each tenant gets its own secret, the same on every ask, and nobody else's
    first, second = api.secrets(acme), api.secrets(globex)
    assert first["secret"].startswith("whsec_") and second["secret"].startswith("whsec_")
    assert first["secret"] != second["secret"]
    assert first["previous"] is None and first["previous_until"] is None
    assert api.secrets(acme) == first
    assert api.secrets(AUTH)["secret"] not in (first["secret"], second["secret"])  # the default tenant's


def test_a_tenant_s_webhooks_verify_with_its_own_secret_and_not_with_another_s(own_stack: Stack, receiver: Receiver) -> None:
    # Given two tenants, each with the secret the API gives its key
    api = deploy(own_stack)
    acme, globex = api.key(tenant()), api.key(tenant())
    acme_secret, globex_secret = api.secrets(acme)["secret"], api.secrets(globex)["secret"]

    # When a job of each sends its completion to a real receiver
    acme_job, acme_hook = api.hooked_job(acme, receiver)
    globex_job, globex_hook = api.hooked_job(globex, receiver)
    (acme_request,) = receiver.wait_for(acme_hook, 1, timeout=60)
    (globex_request,) = receiver.wait_for(globex_hook, 1, timeout=60)

    # Then the Standard Webhooks library verifies each with its tenant's secret
    assert Webhook(acme_secret).verify(acme_request.body, acme_request.headers)["data"]["id"] == acme_job
    assert Webhook(globex_secret).verify(globex_request.body, globex_request.headers)["data"]["id"] == globex_job
    # and not with the other tenant's
    with pytest.raises(WebhookVerificationError):
        Webhook(globex_secret).verify(acme_request.body, acme_request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(acme_secret).verify(globex_request.body, globex_request.headers)

    # And a receiver's client verifies with its own key's tenant's secret only
    with BlazeClient(api.url, api_key=acme["Authorization"].split()[1]) as client:
        assert client.verify_webhook(acme_request.headers, acme_request.body)["data"]["id"] == acme_job
        with pytest.raises(WebhookVerificationError):
            client.verify_webhook(globex_request.headers, globex_request.body)


def test_a_job_s_deliveries_are_404_to_another_tenant(own_stack: Stack, receiver: Receiver) -> None:
    # Given a job of one tenant whose completion was delivered
    api = deploy(own_stack)
    acme, globex = api.key(tenant()), api.key(tenant())
    job_id, hook = api.hooked_job(acme, receiver)
    receiver.wait_for(hook, 1, timeout=60)
    deliveries = f"{api.url}/v1/jobs/{job_id}/deliveries"
    (delivery,) = httpx.get(deliveries, headers=acme, timeout=10).json()["deliveries"]
    redeliver = f"{deliveries}/{delivery['id']}/redeliver"

    # When another tenant lists them or asks to send one again
    listed = httpx.get(deliveries, headers=globex, timeout=10)
    resent = httpx.post(redeliver, headers=globex, timeout=10)

    # Then both are 404, as for a job that does not exist, and nothing was sent again
    missing = httpx.get(f"{api.url}/v1/jobs/{uuid.uuid4()}/deliveries", headers=acme, timeout=10)
    for answer in (listed, resent, missing):
        assert answer.status_code == 404, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
    assert listed.json()["title"] == missing.json()["title"]
    assert len(httpx.get(deliveries, headers=acme, timeout=10).json()["deliveries"]) == 1

    # And the job's own tenant sends it again
    again = httpx.post(redeliver, headers=acme, timeout=10)
    assert again.status_code == 202, again.text
    assert [r.body for r in receiver.wait_for(hook, 2, timeout=60)][1] == receiver.received(hook)[0].body


def test_the_default_tenant_s_secret_is_the_setting_and_is_rotated_only_by_changing_it(own_stack: Stack) -> None:
    # Given an API whose BLAZE_WEBHOOK_SECRET is set
    fixed = "whsec_" + "A" * 43 + "="
    api = Deployment(own_stack, start_api(own_stack, BLAZE_WEBHOOK_SECRET=fixed))
    other = api.key(tenant())

    # Then it is the default tenant's secret only: another tenant has one of its own
    assert api.secrets(AUTH)["secret"] == fixed
    assert api.secrets(other)["secret"] != fixed

    # When the admin token's tenant (the default one) asks to rotate it, Then that is a conflict
    refused = httpx.post(f"{api.url}/v1/webhooks/secret/rotate", headers=AUTH, timeout=10)
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert "BLAZE_WEBHOOK_SECRET" in refused.json()["detail"]
    assert api.secrets(AUTH)["secret"] == fixed


def test_an_upgraded_deployment_s_default_tenant_keeps_its_secret_through_rotations() -> None:
    with own_prefix("secrets") as prefix:
        # Given a Redis holding the deployment's secret from before tenants had their own
        settings = Settings(redis_url=REDIS_URL, redis_prefix=prefix, webhook_secret_grace_s=3600)
        client = redis.Redis.from_url(REDIS_URL)
        client.set(Keys(prefix).webhook_secret, "whsec_old")

        # Then the default tenant signs with it, and another tenant gets a new one
        assert signing.tenant_secrets(client, settings, settings.default_tenant).signing == ["whsec_old"]
        assert signing.tenant_secrets(client, settings, "acme").secret not in ("whsec_old", "")

        # When the default tenant rotates twice
        async def rotate() -> signing.TenantSecrets:
            async with redis.asyncio.Redis.from_url(REDIS_URL) as async_client:
                return await signing.rotate_async(async_client, settings, settings.default_tenant)

        first = asyncio.run(rotate())
        second = asyncio.run(rotate())

        # Then the first rotation keeps the old secret signing beside the new one; the second
        # keeps only the one it replaced
        assert first.previous == "whsec_old" and first.secret.startswith("whsec_")
        assert second.previous == first.secret
        now = signing.tenant_secrets(client, settings, settings.default_tenant)
        assert now.signing == [second.secret, first.secret]
        assert now.previous_until is not None and time.time() + 3500 < now.previous_until <= time.time() + 3600
        client.close()
