"""Worker faults: retries elsewhere up to BLAZE_MAX_ATTEMPTS, and each worker's circuit
breaker (open, a peer takes over, half-open probe, close or reopen longer), against real
echo workers asked to fail with ``"fail": "worker"``."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from blaze_jobs.client import BlazeClient
from blaze_jobs.stack import Stack
from tests.conftest import start_api, wait_for_workers, wait_until

pytestmark = pytest.mark.timeout(150)

# A cool-down long enough for a peer to start and take the waiting job first.
FAST_BREAKER = {"BLAZE_BREAKER_FAILURES": "2", "BLAZE_BREAKER_COOLDOWN_S": "6", "BLAZE_LEASE_S": "3"}


def worker_named(api_url: str, prefix: str) -> dict[str, Any] | None:
    workers = httpx.get(f"{api_url}/v1/workers", timeout=5).json()["workers"]
    return next((w for w in workers if w["name"].startswith(prefix)), None)


def breaker_of(api_url: str, child_pid: int) -> dict[str, Any] | None:
    worker = worker_named(api_url, f"echo-{child_pid}@")
    return worker["breaker"] if worker else None


def test_a_worker_fault_is_retried_then_fails_with_the_reason(own_stack: Stack) -> None:
    # Given two echo workers whose breakers stay closed, and three attempts per job
    env = {"BLAZE_MAX_ATTEMPTS": "3", "BLAZE_BREAKER_FAILURES": "100"}
    api_url = start_api(own_stack, **env)
    for n in range(2):
        own_stack.blaze(f"echo-{n}", "worker", "--engine", "echo", "--concurrency", "1", **env)
    wait_for_workers(api_url, 2)

    with BlazeClient(api_url) as client:
        # When a job always meets a worker fault (a poison job)
        poison = client.wait(client.submit("echo", {"fail": "worker"})["id"], timeout=60)
        # and a bad request fails
        bad = client.wait(client.submit("echo", {"fail": "request"})["id"], timeout=30)
        # Then the poison job ran three times and failed as a worker fault, naming why
        assert poison["status"] == "failed" and poison["attempts"] == 3
        assert poison["error"]["type"] == "worker_fault"
        assert "3 attempts" in poison["error"]["message"] and "echo asked to fail" in poison["error"]["message"]
        # while the bad request failed once, as the request's fault
        assert (bad["status"], bad["attempts"], bad["error"]["type"]) == ("failed", 1, "request")
        # and the fleet still serves good jobs
        assert client.wait(client.submit("echo", {"ok": True})["id"], timeout=30)["status"] == "succeeded"


def test_the_breaker_opens_a_peer_takes_over_and_a_probe_closes_it(own_stack: Stack) -> None:
    env = {**FAST_BREAKER, "BLAZE_MAX_ATTEMPTS": "1"}
    api_url = start_api(own_stack, **env)
    first = own_stack.blaze("echo-a", "worker", "--engine", "echo", "--concurrency", "1", **env)
    wait_for_workers(api_url, 1)

    with BlazeClient(api_url) as client:
        # Given a worker that meets two worker faults in a row (a bad request does not count)
        client.wait(client.submit("echo", {"fail": "request"})["id"], timeout=30)
        for _ in range(2):
            assert client.wait(client.submit("echo", {"fail": "worker"})["id"], timeout=30)["status"] == "failed"

        # Then its breaker opens and it stops taking jobs: a good job waits in the queue
        wait_until(lambda: (breaker_of(api_url, first.pid) or {}).get("state") == "open", timeout=10, what="breaker open")
        waiting = client.submit("echo", {"n": 1})
        time.sleep(1)
        assert client.get(waiting["id"])["status"] == "queued"

        # When a healthy peer starts, it takes the job over
        peer = own_stack.blaze("echo-b", "worker", "--engine", "echo", "--concurrency", "1", **env)
        taken = client.wait(waiting["id"], timeout=60)
        assert taken["status"] == "succeeded" and taken["worker"].startswith(f"echo-{peer.pid}@")
        peer.stop()

        # After the cool-down the first worker is half-open; a probe that faults reopens it
        # with twice the cool-down
        wait_until(lambda: (breaker_of(api_url, first.pid) or {}).get("state") == "half_open", timeout=15, what="half-open")
        assert client.wait(client.submit("echo", {"fail": "worker"})["id"], timeout=30)["status"] == "failed"
        breaker = wait_until(
            lambda: (b := breaker_of(api_url, first.pid)) and b["state"] == "open" and b, timeout=10, what="reopened"
        )
        assert breaker["times_opened"] == 2 and breaker["cooldown_s"] == 12

        # and once half-open again, a good probe closes it
        wait_until(lambda: (breaker_of(api_url, first.pid) or {}).get("state") == "half_open", timeout=25, what="half-open")
        assert client.wait(client.submit("echo", {"n": 2})["id"], timeout=30)["status"] == "succeeded"
        wait_until(lambda: (breaker_of(api_url, first.pid) or {}).get("state") == "closed", timeout=10, what="closed")
        assert client.wait(client.submit("echo", {"n": 3})["id"], timeout=30)["status"] == "succeeded"
