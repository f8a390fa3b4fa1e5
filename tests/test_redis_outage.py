"""Redis goes away and comes back: the API answers 503 quickly instead of hanging, stays
alive, and takes jobs again once Redis is back; the echo worker reconnects by itself.

This module runs its own Redis server, API and echo worker, so stopping Redis disturbs
no other test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from blaze_jobs.stack import Stack, StackError, free_port, redis_reachable
from tests.chaos.harness import PrivateRedis
from tests.conftest import AUTH, wait_until

pytestmark = pytest.mark.timeout(120)

PROBLEM_JSON = "application/problem+json"
#: No request may take longer than this while Redis is down (the API's Redis timeout is 2 s).
PROMPT_ANSWER_S = 5.0


@pytest.fixture()
def deployment(test_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, Any]]:
    with Stack(env=test_env, log_dir=tmp_path) as stack:
        # A Redis that keeps nothing: started again, it is empty
        private = PrivateRedis(stack, data_dir=tmp_path / "redis", persist=False)
        stack.env["BLAZE_REDIS_URL"] = private.url
        try:
            private.start()
            port = free_port()
            api = stack.blaze("api", "api", "--port", str(port))
            worker = stack.blaze("worker-echo", "worker", "--engine", "echo")
            api_url = f"http://127.0.0.1:{port}"
            stack.wait_http("the API", api, f"{api_url}/readyz", timeout=30)
        except StackError as error:
            pytest.fail(str(error))
        yield {"api_url": api_url, "private": private, "worker": worker, "api": api}


def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def assert_unavailable(response: httpx.Response, took: float, what: str) -> None:
    assert response.status_code == 503, f"{what}: {response.status_code} {response.text}"
    assert response.headers["content-type"].startswith(PROBLEM_JSON), f"{what}: {response.headers}"
    problem = response.json()
    assert problem["status"] == 503 and problem["title"] and problem["detail"], problem
    assert took < PROMPT_ANSWER_S, f"{what} took {took:.1f} s"


def succeeded(http: httpx.Client, job_id: str, *, timeout: float) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        response = http.get(f"/v1/jobs/{job_id}")
        job = response.json() if response.status_code == 200 else None
        return job if job and job["status"] in ("succeeded", "failed", "canceled") else None

    job = wait_until(ended, timeout=timeout, what=f"job {job_id} to end", interval=0.1)
    assert job["status"] == "succeeded", job
    return job


def test_the_api_answers_503_while_redis_is_down_and_recovers_after(deployment: dict[str, Any]) -> None:
    private: PrivateRedis = deployment["private"]
    # Given a deployment where an echo job succeeds
    with httpx.Client(base_url=deployment["api_url"], timeout=30, headers=AUTH) as http:
        before = http.post("/v1/jobs", json={"engine": "echo", "input": {"n": 1}})
        assert before.status_code == 202, before.text
        succeeded(http, before.json()["id"], timeout=30)

        # When Redis stops
        private.stop()
        assert not redis_reachable(private.url, timeout=0.2)

        # Then creating a job answers 503 promptly, saying when to retry
        response, took = timed(lambda: http.post("/v1/jobs", json={"engine": "echo", "input": {"n": 2}}))
        assert_unavailable(response, took, "POST /v1/jobs")
        assert int(response.headers["retry-after"]) > 0
        # And reading a job, or listing them, answers 503 promptly too
        response, took = timed(lambda: http.get(f"/v1/jobs/{before.json()['id']}"))
        assert_unavailable(response, took, "GET /v1/jobs/{id}")
        response, took = timed(lambda: http.get("/v1/jobs"))
        assert_unavailable(response, took, "GET /v1/jobs")
        # And the API says it is not ready, though it is alive
        response, took = timed(lambda: http.get("/readyz"))
        assert_unavailable(response, took, "GET /readyz")
        response, took = timed(lambda: http.get("/healthz"))
        assert response.status_code == 200 and took < PROMPT_ANSWER_S
        assert deployment["api"].alive() and deployment["worker"].alive()

        # When a new Redis starts on the same port (empty: the old one kept nothing)
        private.start()

        # Then the API takes jobs again within a bounded time
        def accepted() -> httpx.Response | None:
            response = http.post("/v1/jobs", json={"engine": "echo", "input": {"n": 3}})
            return response if response.status_code == 202 else None

        after = wait_until(accepted, timeout=15, what="POST /v1/jobs to answer 202 again", interval=0.2)
        assert http.get("/readyz").status_code == 200
        # And the echo worker, which reconnected by itself, runs the new job
        job = succeeded(http, after.json()["id"], timeout=60)
        assert job["output"] == {"n": 3, "sleep_ms": 0}
        assert job["attempts"] == 1


def test_the_api_answers_503_while_redis_hangs_and_recovers_after(deployment: dict[str, Any]) -> None:
    private: PrivateRedis = deployment["private"]
    with httpx.Client(base_url=deployment["api_url"], timeout=30, headers=AUTH) as http:
        # Given a deployment that takes jobs
        assert http.post("/v1/jobs", json={"engine": "echo", "input": {"n": 1}}).status_code == 202

        # When Redis hangs: its process is there, its socket open, but it never answers
        private.pause()
        try:
            # Then creating a job and readiness answer 503 once the API's Redis timeout is up
            response, took = timed(lambda: http.post("/v1/jobs", json={"engine": "echo", "input": {"n": 2}}))
            assert_unavailable(response, took, "POST /v1/jobs")
            assert "retry-after" in response.headers
            response, took = timed(lambda: http.get("/readyz"))
            assert_unavailable(response, took, "GET /readyz")
        finally:
            private.resume()

        # When Redis answers again, Then the API takes jobs at once and the worker runs them
        response = wait_until(
            lambda: (r := http.post("/v1/jobs", json={"engine": "echo", "input": {"n": 3}})).status_code == 202 and r,
            timeout=10,
            what="POST /v1/jobs to answer 202 again",
            interval=0.2,
        )
        succeeded(http, response.json()["id"], timeout=30)
