"""The result cache is scoped per tenant by default: a deterministic request one tenant made
before is a cache hit for that tenant only, at creation and in the worker. With
``BLAZE_CACHE_SCOPE=global`` the deployment shares one cache."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

from blaze_jobs import cache
from blaze_jobs.api_keys import create_key
from blaze_jobs.client import BlazeClient
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from tests.conftest import start_api, wait_for_workers

pytestmark = pytest.mark.timeout(180)


def two_tenants(settings: Settings) -> tuple[str, str]:
    """The keys of two new tenants."""
    client = redis.Redis.from_url(settings.redis_url)
    run = uuid.uuid4().hex[:8]
    try:
        first, _ = create_key(client, settings, tenant=f"acme-{run}", name="ci")
        second, _ = create_key(client, settings, tenant=f"globex-{run}", name="ci")
        return first, second
    finally:
        client.close()


def seeded() -> dict[str, Any]:
    """A deterministic echo request (a seed makes it cacheable) of this test's own."""
    return {"marker": str(uuid.uuid4()), "seed": 7}


def test_the_cache_key_names_the_tenant_unless_the_scope_is_global() -> None:
    def key(tenant: str, settings: Settings) -> str:
        return cache.cache_key(engine="echo", model="builtin:echo", input={"seed": 1}, tenant=tenant, settings=settings)

    scoped, shared = Settings(), Settings(cache_scope="global")
    assert key("acme", scoped) != key("globex", scoped)
    assert key("acme", shared) == key("globex", shared)


def test_a_tenants_cache_hit_is_not_another_tenants(stack: dict[str, Any], settings: Settings) -> None:
    first_key, second_key = two_tenants(settings)
    request = seeded()
    with BlazeClient(stack["api_url"], api_key=first_key) as first, BlazeClient(stack["api_url"], api_key=second_key) as second:
        # Given a deterministic request the first tenant has run
        ran = first.wait(first.submit("echo", request)["id"], timeout=60)
        assert ran["status"] == "succeeded" and ran["metrics"]["cache_hit"] is False

        # When the first tenant makes it again, it is born succeeded from the cache
        assert first.submit("echo", request)["metrics"]["cache_hit"] is True

        # But when the second tenant makes it, it is queued and computed for that tenant
        theirs = second.submit("echo", request)
        assert theirs["status"] == "queued" and theirs["metrics"]["cache_hit"] is False
        theirs = second.wait(theirs["id"], timeout=60)
        assert theirs["status"] == "succeeded" and theirs["metrics"]["cache_hit"] is False
        assert theirs["attempts"] == 1 and theirs["output"] == ran["output"]

        # and from then on it is the second tenant's own hit
        assert second.submit("echo", request)["metrics"]["cache_hit"] is True


def test_the_worker_does_not_answer_one_tenant_with_anothers_result(stack: dict[str, Any], settings: Settings) -> None:
    first_key, second_key = two_tenants(settings)
    # Given the same deterministic request queued by two tenants before either ran (the echo
    # worker runs one job at a time, so the second waits for the first to end)
    request = {**seeded(), "sleep_ms": 300}
    with BlazeClient(stack["api_url"], api_key=first_key) as first, BlazeClient(stack["api_url"], api_key=second_key) as second:
        ids = [(first, first.submit("echo", request)["id"]), (second, second.submit("echo", request)["id"])]
        # When both have ended
        jobs = [client.wait(job_id, timeout=60) for client, job_id in ids]
    # Then each was computed: the first's result was no hit for the second, in L1 or L2
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
    assert [j["metrics"]["cache_hit"] for j in jobs] == [False, False]


def test_a_global_scope_shares_hits_between_tenants(own_stack: Stack) -> None:
    # Given a deployment whose cache is global
    scope = {"BLAZE_CACHE_SCOPE": "global"}
    url = start_api(own_stack, **scope)
    own_stack.blaze("worker-echo", "worker", "--engine", "echo", **scope)
    wait_for_workers(url, 1)
    settings = Settings(redis_url=own_stack.env["BLAZE_REDIS_URL"], redis_prefix=own_stack.env["BLAZE_REDIS_PREFIX"])
    first_key, second_key = two_tenants(settings)
    request = seeded()
    with BlazeClient(url, api_key=first_key) as first, BlazeClient(url, api_key=second_key) as second:
        # and a deterministic request the first tenant has run
        ran = first.wait(first.submit("echo", request)["id"], timeout=60)
        assert ran["status"] == "succeeded" and ran["metrics"]["cache_hit"] is False
        # When the second tenant makes it
        hit = second.submit("echo", request)
    # Then it is born succeeded from the first tenant's result
    assert hit["status"] == "succeeded" and hit["metrics"]["cache_hit"] is True
    assert hit["output"] == ran["output"]
