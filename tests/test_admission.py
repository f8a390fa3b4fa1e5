"""Admission before storage: a tenant at its job quota gets 429, a full engine queue 503, and a
Redis at its memory limit 503, each problem+json with ``Retry-After`` and nothing stored; what
was answered 202 exists and completes. (tests/chaos/test_redis_memory.py holds a full Redis for
longer, under load from two workers; here a tenant's rate-limited key meets it.)"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from blaze_jobs.api_keys import create_key
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from tests.chaos.harness import PrivateRedis, chaos_env, wait_all_ended
from tests.chaos.test_redis_memory import MAXMEMORY, empty, fill
from tests.conftest import AUTH, start_api, wait_until

pytestmark = pytest.mark.timeout(240)

PROBLEM_JSON = "application/problem+json"


def tenant_key(stack: Stack, tenant: str, **limits: Any) -> dict[str, str]:
    """The Authorization header of a new key of ``tenant`` with ``limits``."""
    settings = Settings(redis_url=stack.env["BLAZE_REDIS_URL"], redis_prefix=stack.env["BLAZE_REDIS_PREFIX"])
    with redis.Redis.from_url(settings.redis_url) as client:
        secret, _ = create_key(client, settings, tenant=tenant, name="ci", **limits)
    return {"Authorization": f"Bearer {secret}"}


def create(http: httpx.Client, n: int, **headers: str) -> httpx.Response:
    return http.post("/v1/jobs", json={"engine": "echo", "input": {"n": n}}, headers=headers)


def assert_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    """The answer is a ``status`` problem+json with a positive ``Retry-After``; its body."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM_JSON), answer.headers
    assert int(answer.headers["retry-after"]) > 0, answer.headers
    problem: dict[str, Any] = answer.json()
    return problem


def test_a_tenant_at_its_job_quota_gets_429_until_one_of_its_jobs_ends(own_stack: Stack) -> None:
    # Given a tenant's key allowed 2 jobs queued or running, and no worker to run them
    auth = tenant_key(own_stack, "acme", max_jobs=2, rate="10000/minute")
    url = start_api(own_stack)
    with httpx.Client(base_url=url, timeout=30, headers=auth) as http:
        first, second = create(http, 1), create(http, 2)
        assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)

        # When it asks for a third, with an Idempotency-Key
        key = str(uuid.uuid4())
        refused = create(http, 3, **{"Idempotency-Key": key})

        # Then it is refused with a problem naming the quota, its count and limit
        problem = assert_problem(refused, 429)
        assert problem["type"].endswith("quota/jobs"), problem
        assert (problem["tenant"], problem["count"], problem["limit"]) == ("acme", 2, 2), problem
        # And nothing was stored: the tenant still has its two jobs
        assert {j["id"] for j in http.get("/v1/jobs").json()["jobs"]} == {first.json()["id"], second.json()["id"]}
        # And another tenant is not held by acme's quota
        assert create(http, 4, **AUTH).status_code == 202

        # When one of its jobs ends, Then the retry with the same Idempotency-Key is accepted
        # (the refused create released its claim on the key), and answered once more after
        assert http.post(f"/v1/jobs/{first.json()['id']}/cancel").status_code == 200
        retried = create(http, 3, **{"Idempotency-Key": key})
        assert retried.status_code == 202, retried.text
        again = create(http, 3, **{"Idempotency-Key": key})
        assert (again.status_code, again.json()["id"]) == (200, retried.json()["id"])


def test_a_full_engine_queue_answers_503_until_workers_drain_it(own_stack: Stack) -> None:
    # Given an echo queue bounded at 3 messages, and no echo worker yet
    url = start_api(own_stack, BLAZE_QUEUE_MAX="3")
    with httpx.Client(base_url=url, timeout=30, headers=AUTH) as http:
        accepted = [create(http, n) for n in range(3)]
        assert [a.status_code for a in accepted] == [202] * 3, [a.text for a in accepted]

        # When a fourth job is asked for
        refused = create(http, 3)

        # Then the queue's bound answers 503, naming the engine and its bound
        problem = assert_problem(refused, 503)
        assert problem["type"].endswith("queue-full"), problem
        assert (problem["engine"], problem["length"], problem["limit"]) == ("echo", 3, 3), problem

        # When a worker drains the queue, Then creates are accepted again, and every job completes
        own_stack.blaze("worker-echo", "worker", "--engine", "echo")
        later = wait_until(lambda: (a := create(http, 4)).status_code == 202 and a, timeout=120, what="a create accepted")
        ids = [a.json()["id"] for a in [*accepted, later]]
        ended = wait_until(
            lambda: all(http.get(f"/v1/jobs/{i}").json()["status"] == "succeeded" for i in ids) or None,
            timeout=120,
            what="every accepted job succeeded",
        )
        assert ended


def test_a_full_redis_answers_503_to_a_tenant_key_and_completes_what_it_accepted(own_stack: Stack, tmp_path: Path) -> None:
    # Given a Redis with a small maxmemory and noeviction, the API and an echo worker on it,
    # and a tenant's key with a rate and a quota (so its limiter and quota are in the path)
    options = ["--maxmemory", MAXMEMORY, "--maxmemory-policy", "noeviction"]
    server = PrivateRedis(own_stack, data_dir=tmp_path / "redis", persist=False, options=options)
    server.start()
    prefix = own_stack.env["BLAZE_REDIS_PREFIX"]
    own_stack.env.update(chaos_env(own_stack.env, redis_url=server.url, prefix=prefix))
    auth = tenant_key(own_stack, "acme", max_jobs=100, rate="10000/minute")
    url = start_api(own_stack)
    own_stack.blaze("worker-echo", "worker", "--engine", "echo")
    with httpx.Client(base_url=url, timeout=30, headers=auth) as http, server.client() as client:
        accepted = [create(http, n) for n in range(3)]
        assert [a.status_code for a in accepted] == [202] * 3, [a.text for a in accepted]
        ids = [a.json()["id"] for a in accepted]

        # When Redis reaches its memory limit and the tenant keeps creating (with and without
        # an Idempotency-Key)
        fill(client, "filler:")
        answers = []
        for n in range(6):
            fill(client, "filler:")  # what freed meanwhile (a connection's buffers) is taken again
            headers = {"Idempotency-Key": str(uuid.uuid4())} if n % 2 else {}
            answers.append(create(http, 100 + n, **headers))

        # Then each create is a 202 or a 503 problem+json with Retry-After, never a 500,
        # and at least one was refused
        refused = [a for a in answers if a.status_code != 202]
        assert refused, [a.text for a in answers]
        for answer in refused:
            assert_problem(answer, 503)
        ids += [a.json()["id"] for a in answers if a.status_code == 202]
        # And the tenant's key still reads its jobs (a request its limiter could not count is let through)
        assert http.get(f"/v1/jobs/{ids[0]}").status_code == 200

        # When memory frees, Then creates are accepted again and every job answered 202 completes
        empty(client, "filler:")
        wait_until(lambda: http.get("/readyz").status_code == 200, timeout=60, what="the API ready again")
        after = create(http, 200)
        assert after.status_code == 202, after.text
        ids.append(after.json()["id"])
    records = wait_all_ended(server.url, prefix, ids, timeout=120)
    assert {i: r.get("status") for i, r in records.items()} == {i: "succeeded" for i in ids}
    # And the refused creates left no job behind
    with server.client(decode_responses=True) as client:
        stored = {k.removeprefix(f"{prefix}job:") for k in client.scan_iter(match=f"{prefix}job:*")}
    assert stored == set(ids)
