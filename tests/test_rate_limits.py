"""Request rates per API key, counted in Redis and shared by every API process: past its rate a
key gets 429 problem+json with ``Retry-After`` and the IETF ``RateLimit-Policy`` /
``RateLimit`` headers, and the window frees when ``Retry-After`` says."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
import redis

from blaze_jobs.api_keys import create_key
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack, StackError, free_port
from tests.chaos.harness import PrivateRedis, chaos_env
from tests.conftest import start_api

pytestmark = pytest.mark.timeout(180)

PROBLEM_JSON = "application/problem+json"
RATE_LIMIT = re.compile(r'^"default";r=0;t=(\d+)$')


def key_with_rate(stack: Stack, rate: str, *, tenant: str = "acme", name: str = "ci") -> str:
    """A new API key of ``tenant`` limited to ``rate``; its secret."""
    settings = Settings(redis_url=stack.env["BLAZE_REDIS_URL"], redis_prefix=stack.env["BLAZE_REDIS_PREFIX"])
    with redis.Redis.from_url(settings.redis_url) as client:
        secret, _ = create_key(client, settings, tenant=tenant, name=name, rate=rate)
    return secret


def start_api_processes(stack: Stack, name: str, *, workers: int) -> str:
    """``blaze api --workers N`` in ``stack``; its URL once ready."""
    port = free_port()
    api = stack.blaze(name, "api", "--port", str(port), "--workers", str(workers))
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(name, api, f"{url}/readyz", timeout=90)
    except StackError as error:
        pytest.fail(str(error))
    return url


def list_jobs(url: str, secret: str) -> httpx.Response:
    """One request on a connection of its own (so uvicorn may hand it to any of its processes)."""
    return httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {secret}"}, timeout=30)


def test_a_key_past_its_rate_gets_429_with_rate_limit_headers_across_api_processes(own_stack: Stack) -> None:
    # Given a key allowed 5 requests a minute, and two APIs on one Redis: `blaze api --workers 2`
    # and a second `blaze api` on its own port, so requests surely reach different processes
    secret = key_with_rate(own_stack, "5/minute")
    many = start_api_processes(own_stack, "api-two-workers", workers=2)
    other = start_api_processes(own_stack, "api-other", workers=1)

    # When the key makes 5 requests alternating between them, each on a new connection
    allowed = [list_jobs(url, secret) for url in (many, other, many, other, many)]

    # Then all 5 are answered, and the 6th, wherever it goes, is refused
    assert [a.status_code for a in allowed] == [200] * 5, [a.text for a in allowed]
    for url in (other, many):
        refused = list_jobs(url, secret)
        assert refused.status_code == 429, refused.text
        assert refused.headers["content-type"].startswith(PROBLEM_JSON)
        problem = refused.json()
        assert problem["type"].endswith("rate-limit") and problem["limit"] == 5 and problem["window_s"] == 60, problem
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 60, refused.headers
        assert refused.headers["ratelimit-policy"] == '"default";q=5;w=60', refused.headers
        reset = RATE_LIMIT.match(refused.headers["ratelimit"])
        assert reset is not None and int(reset.group(1)) == retry_after, refused.headers


def test_a_busy_key_is_counted_in_batches_and_never_passes_its_rate(own_stack: Stack) -> None:
    # Given a key allowed 1,000 requests a minute (a process takes up to 10 slots at a time)
    secret = key_with_rate(own_stack, "1000/minute")
    url = start_api(own_stack)

    # When it sends 1,050 requests as fast as one connection goes
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as http:
        codes = [http.get("/v1/jobs", params={"limit": 1}).status_code for _ in range(1050)]

    # Then never more than 1,000 are answered, and at most one batch of slots goes unused
    answered = codes.count(200)
    assert 990 <= answered <= 1000, answered
    assert codes.count(429) == 1050 - answered, set(codes)
    # and once refused, every later request is refused too (the window is full for a minute)
    assert 200 not in codes[codes.index(429) :], codes[codes.index(429) :][:20]


def test_the_window_frees_when_retry_after_says_and_each_key_has_its_own(own_stack: Stack) -> None:
    # Given a key allowed 2 requests in 10 seconds, and another key of the same tenant
    limited = key_with_rate(own_stack, "2/10 seconds", name="limited")
    fresh = key_with_rate(own_stack, "2/10 seconds", name="fresh")
    url = start_api(own_stack)

    # When the first key makes 3 requests at once
    answers = [list_jobs(url, limited) for _ in range(3)]

    # Then the third is refused, and the other key is not limited by it
    assert [a.status_code for a in answers] == [200, 200, 429], [a.text for a in answers]
    assert list_jobs(url, fresh).status_code == 200
    retry_after = int(answers[-1].headers["retry-after"])
    assert 1 <= retry_after <= 10, answers[-1].headers

    # And once Retry-After has passed, the key is allowed again
    time.sleep(retry_after)
    again = list_jobs(url, limited)
    assert again.status_code == 200, again.text


def test_a_rate_limited_key_meets_an_unreachable_redis_with_503(own_stack: Stack, tmp_path: Path) -> None:
    # Given a private Redis, an API on it that trusts a key it looked up for a minute, and a
    # rate-limited key that has made a request (so its next one needs Redis only for its count)
    server = PrivateRedis(own_stack, data_dir=tmp_path / "redis", persist=False)
    server.start()
    own_stack.env.update(chaos_env(own_stack.env, redis_url=server.url, prefix=own_stack.env["BLAZE_REDIS_PREFIX"]))
    secret = key_with_rate(own_stack, "100/minute")
    url = start_api(own_stack, BLAZE_KEY_CACHE_S="60")
    assert list_jobs(url, secret).status_code == 200

    # When Redis goes away
    server.stop(kill=True)

    # Then the key's request is a 503 problem with Retry-After (the limiter's redis-py error,
    # not a 500)
    answer = list_jobs(url, secret)
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM_JSON)
    assert int(answer.headers["retry-after"]) > 0
