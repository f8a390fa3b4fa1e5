"""``Idempotency-Key`` on ``POST /v1/jobs``: retries of one create make one job, even when they
race each other across API processes; the key is the tenant's own; a different body with the
same key, or a malformed key, is refused naming ``Idempotency-Key``."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from hashlib import sha256
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

from blaze_jobs.api_keys import create_key
from blaze_jobs.broker import queue_key, task_message
from blaze_jobs.errors import ClaimTakenOver
from blaze_jobs.jobs import new_record
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack, StackError, free_port
from blaze_jobs.store import AsyncJobStore

pytestmark = pytest.mark.timeout(180)

BODY = {"engine": "echo", "input": {"text": "once"}}


def tenant_key(stack: Stack, tenant: str) -> dict[str, str]:
    """The Authorization header of a new key of ``tenant``, with no rate limit to meet here."""
    settings = Settings(redis_url=stack.env["BLAZE_REDIS_URL"], redis_prefix=stack.env["BLAZE_REDIS_PREFIX"])
    with redis.Redis.from_url(settings.redis_url) as client:
        secret, _ = create_key(client, settings, tenant=tenant, name="ci", rate="10000/minute")
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture()
def api_url(own_stack: Stack) -> str:
    """``blaze api --workers 2`` of this test's own, and no worker: jobs stay queued."""
    port = free_port()
    api = own_stack.blaze("api", "api", "--port", str(port), "--workers", "2")
    url = f"http://127.0.0.1:{port}"
    try:
        own_stack.wait_http("the API", api, f"{url}/readyz", timeout=90)
    except StackError as error:
        pytest.fail(str(error))
    return url


def create(url: str, auth: dict[str, str], key: str, body: dict[str, Any] = BODY) -> httpx.Response:
    """One create on a connection of its own, with ``key`` as its Idempotency-Key."""
    return httpx.post(f"{url}/v1/jobs", json=body, headers={**auth, "Idempotency-Key": key}, timeout=30)


def test_twenty_racing_creates_with_one_key_make_one_job(own_stack: Stack, api_url: str) -> None:
    # Given a tenant's key and one Idempotency-Key
    auth = tenant_key(own_stack, "acme")
    key = str(uuid.uuid4())

    # When 20 identical creates carrying it race each other, each on its own connection
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: create(api_url, auth, key), range(20)))

    # Then every answer is the one job: one 202 that made it, 19 answering it with 200
    assert sorted(a.status_code for a in answers) == [200] * 19 + [202], [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1, ids
    assert {a.headers["location"] for a in answers} == {f"{api_url}/v1/jobs/{ids.pop()}"}
    # And the tenant's list holds that one job
    listed = httpx.get(f"{api_url}/v1/jobs", headers=auth, timeout=30).json()["jobs"]
    assert [j["id"] for j in listed] == [answers[0].json()["id"]]


def test_the_same_key_with_another_body_is_refused_and_another_tenant_has_its_own(own_stack: Stack, api_url: str) -> None:
    # Given a job made with an Idempotency-Key
    acme, globex = tenant_key(own_stack, "acme"), tenant_key(own_stack, "globex")
    key = "order-42"
    first = create(api_url, acme, key)
    assert first.status_code == 202, first.text

    # When the same tenant sends the key with another body
    other_body = create(api_url, acme, key, {"engine": "echo", "input": {"text": "twice"}})

    # Then it is refused naming the header, and the key still answers its own job
    assert other_body.status_code == 422, other_body.text
    assert other_body.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in other_body.json()["errors"]] == ["Idempotency-Key"]
    again = create(api_url, acme, key)
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])

    # When another tenant sends the same key and body, Then it is a job of that tenant's own
    theirs = create(api_url, globex, key)
    assert theirs.status_code == 202, theirs.text
    assert theirs.json()["id"] != first.json()["id"]
    assert httpx.get(theirs.headers["location"], headers=acme, timeout=30).status_code == 404


def test_a_malformed_key_is_refused_naming_the_header(own_stack: Stack, api_url: str) -> None:
    # Given a tenant's key
    auth = tenant_key(own_stack, "acme")

    # When creates carry an empty, an overlong and an unprintable Idempotency-Key
    answers = [create(api_url, auth, key) for key in ("", "x" * 256, "tab\there")]

    # Then each is refused naming the header, and nothing is stored
    assert [a.status_code for a in answers] == [422] * 3, [a.text for a in answers]
    assert [[e["field"] for e in a.json()["errors"]] for a in answers] == [["Idempotency-Key"]] * 3
    assert httpx.get(f"{api_url}/v1/jobs", headers=auth, timeout=30).json()["jobs"] == []
    # And a key of 255 characters is fine
    assert create(api_url, auth, "x" * 255).status_code == 202


def test_a_claim_whose_create_never_finished_is_taken_over_once_stale(own_stack: Stack, api_url: str) -> None:
    # Given the claims two earlier creates left behind on their keys, for jobs never stored
    # (their API went away between claiming and creating): one long ago, one just now
    auth = tenant_key(own_stack, "acme")
    first = create(api_url, auth, "seen")
    assert first.status_code == 202, first.text
    keys = Keys(own_stack.env["BLAZE_REDIS_PREFIX"])
    settings = Settings()
    ttl_s = min(settings.idempotency_ttl_s, settings.job_ttl_s)  # the API's defaults, as the stack runs
    with redis.Redis.from_url(own_stack.env["BLAZE_REDIS_URL"], decode_responses=True) as client:
        _, printed = client.get(keys.idempotency("acme", sha256(b"seen").hexdigest())).split(" ")
        stale, recent = sha256(b"stale").hexdigest(), sha256(b"recent").hexdigest()
        # Its remaining life tells a claim's age: this one was made a minute ago.
        client.set(keys.idempotency("acme", stale), f"{uuid.uuid4()} {printed}", ex=ttl_s - 60)
        client.set(keys.idempotency("acme", recent), f"{uuid.uuid4()} {printed}", ex=ttl_s)

    # When a retry comes with the stale key, Then it creates the job, and the key answers it since
    taken = create(api_url, auth, "stale")
    assert taken.status_code == 202, taken.text
    assert (create(api_url, auth, "stale").json()["id"]) == taken.json()["id"]

    # When one comes with the recent key, Then it waits for that create, and answers 409 in the end
    waited = create(api_url, auth, "recent")
    assert waited.status_code == 409, waited.text
    assert waited.headers["content-type"].startswith("application/problem+json")
    assert waited.headers["retry-after"] == "1"


def test_a_create_whose_claim_was_taken_over_stores_nothing(own_stack: Stack) -> None:
    # Given a create that claimed its Idempotency-Key, and a retry that has since taken the
    # claim over (it looked stale: the first create was stalled past any create's time)
    settings = Settings(redis_url=own_stack.env["BLAZE_REDIS_URL"], redis_prefix=own_stack.env["BLAZE_REDIS_PREFIX"])
    keys = Keys(settings.redis_prefix)
    claim_key = keys.idempotency("acme", sha256(b"retry-me").hexdigest())
    late, retry = str(uuid.uuid4()), str(uuid.uuid4())

    async def late_create() -> None:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            await client.set(claim_key, f"{retry} fingerprint")  # the retry holds it now
            store = AsyncJobStore(client, settings)
            record = new_record(job_id=late, tenant="acme", engine="echo", model="builtin:echo", input={}, created_at=time.time())
            message = task_message(job_id=late, engine="echo", input={}, tenant="acme")
            # When the stalled create finally runs, under its own (lost) claim
            with pytest.raises(ClaimTakenOver):
                await store.create_queued(
                    record, queue=queue_key(settings, "echo"), message=message, claim=(claim_key, f"{late} fp")
                )
        finally:
            await client.aclose()

    asyncio.run(late_create())

    # Then it stored nothing: no record, no queued message, no index entry
    with redis.Redis.from_url(settings.redis_url) as client:
        assert not client.exists(keys.job(late))
        assert client.llen(keys.queue("echo")) == 0
        assert client.zcard(keys.tenant_all("acme")) == 0
