"""Blaze Jobs will not run on a Redis that evicts (it would delete accepted jobs without a
word), and says so when Redis persists nothing; ``/readyz`` tells the same while it runs.

This module runs its own Redis server, whose configuration it changes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import redis

from blaze_jobs.redis_config import refusal
from blaze_jobs.stack import Child, Stack, free_port
from tests.chaos.harness import PrivateRedis, wait_http
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(150)


def refused(child: Child) -> str:
    """Wait for ``child`` to exit on its own; its log."""
    wait_until(lambda: not child.alive(), timeout=60, what=f"{child.name} to refuse to run")
    assert child.process.returncode != 0, child.log_tail()
    return child.log_path.read_text(errors="replace")


def test_api_and_workers_refuse_an_evicting_redis_and_warn_about_one_that_persists_nothing(
    test_env: dict[str, str], tmp_path: Path
) -> None:
    with Stack(env=test_env, log_dir=tmp_path) as stack:
        # Given a Redis that evicts (allkeys-lru, what a careless operator sets) and persists nothing
        server = PrivateRedis(stack, data_dir=tmp_path / "redis", persist=False, options=["--maxmemory-policy", "allkeys-lru"])
        server.start()
        stack.env["BLAZE_REDIS_URL"] = server.url

        # When the API and a worker start on it, Then each refuses, naming the setting and its fix
        api = stack.blaze("api", "api", "--port", str(free_port()))
        worker = stack.blaze("worker-echo", "worker", "--engine", "echo")
        for child in (api, worker):
            log = refused(child)
            assert "maxmemory-policy allkeys-lru" in log and "Set maxmemory-policy noeviction" in log, log[-2000:]

        # Given the operator sets noeviction, still without persistence
        with server.client() as client:
            client.config_set("maxmemory-policy", "noeviction")
            port = free_port()
            api = stack.blaze("api-2", "api", "--port", str(port))
            api_url = f"http://127.0.0.1:{port}"
            wait_http(stack, api, f"{api_url}/readyz")
            with httpx.Client(base_url=api_url, timeout=10) as http:
                # Then the API is ready, and says (and logs) that a restart of Redis loses every job
                ready = http.get("/readyz").json()
                assert ready["status"] == "ready" and any("appendonly yes" in w for w in ready["warnings"]), ready
                assert "Redis persists nothing" in api.log_path.read_text()

                # When the operator turns eviction on while it runs, Then it is not ready, saying why
                client.config_set("maxmemory-policy", "volatile-lru")
                answer = http.get("/readyz")
                assert answer.status_code == 503 and answer.headers["content-type"].startswith("application/problem+json")
                assert "maxmemory-policy volatile-lru" in answer.json()["detail"], answer.json()

                # When Redis neither evicts nor forgets, Then it is ready with nothing to warn of
                client.config_set("maxmemory-policy", "noeviction")
                client.config_set("appendonly", "yes")
                assert http.get("/readyz").json() == {"status": "ready", "warnings": []}


def test_a_write_refused_for_memory_is_known_as_such_however_redis_words_it() -> None:
    # Redis 7 answers a script's refused write as OOM; Redis 6 wraps it in the script's error.
    assert refusal(redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    wrapped = "Error running script (call to f_1): @user_script:1: -OOM command not allowed when used memory > 'maxmemory'."
    assert refusal(redis.exceptions.ResponseError(wrapped)) == refusal(redis.exceptions.OutOfMemoryError("x"))
    assert refusal(redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots"))
    # Any other error Redis answers is no refusal
    assert refusal(redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")) is None
    assert refusal(redis.exceptions.ConnectionError("Connection refused")) is None
