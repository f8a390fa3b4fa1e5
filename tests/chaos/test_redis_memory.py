"""Redis at its memory limit (``maxmemory`` with ``noeviction``, as Blaze Jobs requires): new
jobs are refused with 503 problem+json and ``Retry-After``, ``/readyz`` says not ready, the
workers stay alive, and once memory frees they resume: every job answered 202 exists and
completes, and none is left running or queued."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from blaze_jobs.stack import Stack, free_port
from tests.chaos.harness import (
    PrivateRedis,
    Row,
    admin_headers,
    chaos_env,
    tally,
    wait_all_ended,
    wait_http,
    wait_running,
    wait_workers,
)

pytestmark = pytest.mark.timeout(240)

PROBLEM_JSON = "application/problem+json"
#: Small, so a few filler writes reach it; large enough for the stack's own keys.
MAXMEMORY = "24mb"
THREADS = 2


def create(http: httpx.Client, n: int, *, sleep_ms: int) -> httpx.Response | str:
    """One create; the answer, or what went wrong on the connection."""
    try:
        return http.post("/v1/jobs", json={"engine": "echo", "input": {"n": n, "sleep_ms": sleep_ms}})
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}"


def fill(client: redis.Redis, prefix: str) -> int:
    """Write filler keys until Redis refuses writes for memory, ever smaller, so it ends right
    at its limit; returns how many were written."""
    written = 0
    for size in (256 * 1024, 16 * 1024, 1024):
        try:
            while True:
                client.set(f"{prefix}{uuid.uuid4().hex}", b"x" * size)
                written += 1
        except redis.exceptions.OutOfMemoryError:
            pass
    return written


def empty(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


def scenario_redis_memory(*, env: dict[str, str], tmp_path: Path, scale: int) -> Row:
    """Redis held at its memory limit for ``5 × scale`` seconds while jobs run and clients
    keep creating; then memory frees."""
    hold_s = 5.0 * scale
    prefix, filler = "blaze-chaos-memory:", "chaos-filler:"
    row = Row("redis_memory", notes={"hold_s": hold_s})
    with Stack(env=env, log_dir=tmp_path) as stack:
        options = ["--maxmemory", MAXMEMORY, "--maxmemory-policy", "noeviction"]
        server = PrivateRedis(stack, data_dir=tmp_path / "redis", persist=False, options=options)
        server.start()
        stack.env.update(chaos_env(stack.env, redis_url=server.url, prefix=prefix))
        port = free_port()
        api = stack.blaze("api", "api", "--port", str(port))
        workers = [stack.blaze(f"worker-{i}", "worker", "--engine", "echo", "--concurrency", str(THREADS)) for i in range(2)]
        api_url = f"http://127.0.0.1:{port}"
        wait_http(stack, api, f"{api_url}/readyz")
        wait_workers(api_url, 2, engine="echo", headers=admin_headers(env))
        accepted: list[str] = []
        bad: list[str] = []
        refused = 0
        with httpx.Client(base_url=api_url, timeout=30, headers=admin_headers(env)) as http, server.client() as client:
            # Given jobs running on both workers and more queued behind them
            for n in range(8 * THREADS):
                answer = create(http, n, sleep_ms=1000)
                assert isinstance(answer, httpx.Response) and answer.status_code == 202, answer
                accepted.append(answer.json()["id"])
            wait_running(server.url, prefix, accepted, at_least=2 * THREADS)

            # When Redis reaches its memory limit and stays there while clients keep creating
            row.notes["filler_keys"] = fill(client, filler)
            deadline = time.monotonic() + hold_s
            n = 0
            while time.monotonic() < deadline:
                n += 1
                # Keep Redis at its limit: what frees meanwhile (a connection's buffers) is taken again.
                row.notes["filler_keys"] += fill(client, filler)
                answer = create(http, 1000 + n, sleep_ms=100)
                if isinstance(answer, str):
                    bad.append(answer)
                elif answer.status_code == 202:
                    accepted.append(answer.json()["id"])
                elif (
                    answer.status_code == 503
                    and answer.headers.get("content-type", "").startswith(PROBLEM_JSON)
                    and int(answer.headers.get("retry-after", "0")) > 0
                ):
                    refused += 1
                else:
                    bad.append(f"{answer.status_code} {answer.headers.get('content-type')} {answer.text[:200]}")
                time.sleep(0.05)
            ready = http.get("/readyz")
            row.notes["readyz_while_full"] = ready.status_code
            row.notes["workers_alive_while_full"] = sum(w.alive() for w in workers)

            # Then, once memory frees, the API is ready again and every accepted job completes
            empty(client, filler)
            freed = time.monotonic()
            deadline = freed + 30
            while http.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            for n in range(2 * THREADS):
                answer = create(http, 2000 + n, sleep_ms=100)
                if isinstance(answer, httpx.Response) and answer.status_code == 202:
                    accepted.append(answer.json()["id"])
                else:
                    bad.append(f"after memory freed: {answer if isinstance(answer, str) else answer.status_code}")
            records = wait_all_ended(server.url, prefix, accepted, timeout=90)
            row.recovery_s = round(time.monotonic() - freed, 1)
        tally(row, records)
        row.notes["refused_503"] = refused
        row.notes["bad_answers"] = bad[:5]
        row.notes["bad_answer_count"] = len(bad)
        row.notes["workers_alive"] = sum(w.alive() for w in workers)
        row.notes["worker_logs"] = {w.name: w.log_tail(12) for w in workers if not w.alive()}
    return row


def test_a_full_redis_refuses_new_jobs_with_503_and_loses_none_it_accepted(test_env: dict[str, str], tmp_path: Path) -> None:
    row = scenario_redis_memory(env=test_env, tmp_path=tmp_path, scale=1)
    assert row.notes["refused_503"] > 0 and row.notes["bad_answer_count"] == 0, row
    assert row.notes["readyz_while_full"] == 503, row
    assert row.notes["workers_alive_while_full"] == 2 and row.notes["workers_alive"] == 2, row
    assert (row.lost, row.run_twice, row.wrongly_failed) == (0, 0, 0), row
