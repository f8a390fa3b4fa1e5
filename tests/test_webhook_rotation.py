"""A tenant rotates its webhook secret without losing an event: for the grace period every
delivery carries a signature by the new secret and one by the old, so a receiver holding
either verifies it; after that, only the new one signs."""

from __future__ import annotations

import time
from datetime import datetime

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from blaze_jobs import signing
from blaze_jobs.client import BlazeClient
from blaze_jobs.stack import Stack
from blaze_jobs.webhooks import SECRETS_CACHE_S
from tests.conftest import AUTH, wait_until
from tests.receiver import Receiver
from tests.test_webhook_secret import deploy, tenant

pytestmark = pytest.mark.timeout(180)


def test_during_the_grace_period_deliveries_verify_with_the_old_secret_and_the_new(
    own_stack: Stack, receiver: Receiver, request: pytest.FixtureRequest
) -> None:
    # Given a tenant whose receiver verifies with the secret it has, and a delivery signed by it
    api = deploy(own_stack)
    acme = tenant()
    key = api.key(acme)
    old = api.secrets(key)["secret"]
    before = BlazeClient(api.url, api_key=key["Authorization"].split()[1])
    request.addfinalizer(before.close)
    before.webhook_secret()  # the receiver's client holds the old secret
    _, hook = api.hooked_job(key, receiver)
    (first,) = receiver.wait_for(hook, 1, timeout=60)
    assert first.headers["webhook-signature"].count("v1,") == 1
    Webhook(old).verify(first.body, first.headers)

    # When the tenant rotates its secret
    asked = time.time()
    rotated = httpx.post(f"{api.url}/v1/webhooks/secret/rotate", headers=key, timeout=10)

    # Then it gets a new one, and the old one stays for the grace period (a day by default)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new.startswith("whsec_") and new != old
    assert rotated.json()["previous"] == old
    until = datetime.fromisoformat(rotated.json()["previous_until"]).timestamp()
    assert asked + 86_400 - 60 < until < time.time() + 86_400 + 1
    again = api.secrets(key)
    assert (again["secret"], again["previous"]) == (new, old)
    assert abs(datetime.fromisoformat(again["previous_until"]).timestamp() - until) < 1  # read from the old one's TTL
    # and the audit trail says who rotated it
    trail = httpx.get(f"{api.url}/v1/admin/audit", headers=AUTH, timeout=10).json()["entries"]
    (entry,) = [e for e in trail if e["action"] == "webhook_secret.rotate"]
    assert (entry["tenant"], entry["target"], entry["who"]["tenant"]) == (acme, acme, acme)

    # When a job ends once webhook workers have read the secrets again
    time.sleep(SECRETS_CACHE_S)
    job_id, hook = api.hooked_job(key, receiver)
    (during,) = receiver.wait_for(hook, 1, timeout=60)

    # Then its delivery carries two signatures, and the library verifies it with either secret
    assert during.headers["webhook-signature"].count("v1,") == 2
    assert Webhook(new).verify(during.body, during.headers)["data"]["id"] == job_id
    assert Webhook(old).verify(during.body, during.headers)["data"]["id"] == job_id
    # as do a client that read the old secret and one reading the new
    assert before.verify_webhook(during.headers, during.body)["data"]["id"] == job_id
    with BlazeClient(api.url, api_key=key["Authorization"].split()[1]) as after:
        assert after.webhook_secret() == new
        assert after.verify_webhook(during.headers, during.body)["data"]["id"] == job_id


def test_after_the_grace_period_only_the_new_secret_verifies(
    own_stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # Given a deployment whose rotations keep the old secret for one second, and a tenant
    # whose receiver's client read the secret before it was rotated
    api = deploy(own_stack, BLAZE_WEBHOOK_SECRET_GRACE_S="1")
    key = api.key(tenant())
    old = api.secrets(key)["secret"]
    before = BlazeClient(api.url, api_key=key["Authorization"].split()[1])
    request.addfinalizer(before.close)
    assert before.webhook_secret() == old

    # When the tenant rotates its secret, and the grace period ends
    rotated = httpx.post(f"{api.url}/v1/webhooks/secret/rotate", headers=key, timeout=10)
    assert rotated.status_code == 200 and rotated.json()["previous"] == old, rotated.text
    new = rotated.json()["secret"]
    wait_until(lambda: api.secrets(key)["previous"] is None, timeout=30, what="the old secret to expire")
    assert api.secrets(key)["secret"] == new

    # Then a job's delivery carries the new secret's signature only
    job_id, hook = api.hooked_job(key, receiver)
    (after,) = receiver.wait_for(hook, 1, timeout=60)
    assert after.headers["webhook-signature"].count("v1,") == 1
    assert Webhook(new).verify(after.body, after.headers)["data"]["id"] == job_id
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(after.body, after.headers)

    # And the client holding the old secret refuses it until it may ask the API again, then
    # reads the new one and verifies it
    monkeypatch.setattr(signing, "REFETCH_S", 1e9)
    with pytest.raises(WebhookVerificationError):
        before.verify_webhook(after.headers, after.body)
    monkeypatch.setattr(signing, "REFETCH_S", 0.0)
    assert before.verify_webhook(after.headers, after.body)["data"]["id"] == job_id
    assert before.webhook_secret() == new


def test_after_a_leak_a_rotation_without_grace_drops_the_old_secret_at_once(own_stack: Stack, receiver: Receiver) -> None:
    # Given a tenant whose secret has leaked, and a delivery signed by it
    api = deploy(own_stack)
    key = api.key(tenant())
    old = api.secrets(key)["secret"]
    _, hook = api.hooked_job(key, receiver)
    (first,) = receiver.wait_for(hook, 1, timeout=60)
    Webhook(old).verify(first.body, first.headers)

    # When it asks for a grace period that is no number of seconds from 0 up
    for wrong in ("-1", "soon", "inf"):
        refused = httpx.post(f"{api.url}/v1/webhooks/secret/rotate", params={"grace_s": wrong}, headers=key, timeout=10)
        # Then it is refused, naming grace_s, and the secret stays
        assert refused.status_code == 422, refused.text
        assert [e["field"] for e in refused.json()["errors"]] == ["grace_s"], refused.text
    assert api.secrets(key)["secret"] == old

    # When it rotates with grace_s=0
    rotated = httpx.post(f"{api.url}/v1/webhooks/secret/rotate", params={"grace_s": 0}, headers=key, timeout=10)

    # Then the old secret is gone at once: the answer and later reads name the new one only
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old
    assert (rotated.json()["previous"], rotated.json()["previous_until"]) == (None, None)
    assert (api.secrets(key)["secret"], api.secrets(key)["previous"]) == (new, None)

    # And once webhook workers have read the secrets again, a delivery carries one signature,
    # which verifies with the new secret and not with the leaked one
    time.sleep(SECRETS_CACHE_S)
    job_id, hook = api.hooked_job(key, receiver)
    (after,) = receiver.wait_for(hook, 1, timeout=60)
    assert after.headers["webhook-signature"].count("v1,") == 1
    assert Webhook(new).verify(after.body, after.headers)["data"]["id"] == job_id
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(after.body, after.headers)
