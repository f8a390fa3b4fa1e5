"""Redis restarts, again and again, while two echo workers run jobs: every worker outlives
every restart and serves its queue afterwards, and no accepted job is lost, run twice or
failed.

The Redis here persists (append-only, fsync always), as a deployment's does, so what it
held before a restart is there after it: a job lost is Blaze Jobs' doing, not Redis's."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from blaze_jobs.stack import Child, Stack
from tests.chaos.harness import PrivateRedis, Row, admin_headers, redis_and_api, tally, wait_all_ended, wait_running, wait_workers

pytestmark = pytest.mark.timeout(240)

#: Task threads per worker: with prefetch 1 a worker holds at most this many messages, so a
#: burst of twice as many jobs needs both workers.
THREADS = 4
#: The jobs of a burst after a restart: short, so bursts come one after another.
JOB_SLEEP_MS = 1500
#: Jobs running across each outage: fewer than both workers' threads, so each worker is
#: also waiting on the queue (a blocking read in flight) when Redis goes, as in production.
SPANNING_JOBS = THREADS


def submit(http: httpx.Client, count: int, *, sleep_ms: int, timeout: float = 30) -> list[str]:
    """Create ``count`` echo jobs, retrying each while the API answers 503 (Redis coming back)."""
    ids = []
    for n in range(count):
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = http.post("/v1/jobs", json={"engine": "echo", "input": {"n": n, "sleep_ms": sleep_ms}})
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 202:
                ids.append(response.json()["id"])
                break
            assert response is None or response.status_code == 503, response.text
            assert time.monotonic() < deadline, f"POST /v1/jobs kept failing: {response and response.text}"
            time.sleep(0.2)
    return ids


def serve_until_both(
    http: httpx.Client, server: PrivateRedis, prefix: str, ids: list[str], *, workers: list[Child], deadline: float
) -> set[str]:
    """Send bursts that need both workers until each has run a job of one (or one died, or
    time is up); the names of the workers that did. One still reconnecting misses a burst."""
    seen: set[str] = set()
    while len(seen) < 2 and all(w.alive() for w in workers) and time.monotonic() < deadline:
        burst = submit(http, 2 * THREADS, sleep_ms=JOB_SLEEP_MS)
        ids += burst
        ended = wait_all_ended(server.url, prefix, burst, timeout=max(1.0, deadline - time.monotonic()))
        seen |= {r["worker"] for r in ended.values() if r.get("status") == "succeeded" and r.get("worker")}
    return seen


def scenario_redis_restarts(*, env: dict[str, str], tmp_path: Path, scale: int) -> Row:
    """``4 × scale`` restarts (at most 10) of ``3 × scale`` seconds (at most 15), each while
    jobs run that outlast the outage; after each, both workers must run jobs again."""
    return run_restarts(env=env, tmp_path=tmp_path, restarts=min(10, 4 * scale), outage_s=min(15.0, 3.0 * scale))


def run_restarts(*, env: dict[str, str], tmp_path: Path, restarts: int, outage_s: float) -> Row:
    prefix = "blaze-chaos-restarts:"
    row = Row("redis_restarts", notes={"restarts": restarts, "outage_s": outage_s})
    with Stack(env=env, log_dir=tmp_path) as stack:
        server, api_url = redis_and_api(stack, tmp_path, prefix=prefix)
        workers = [stack.blaze(f"worker-{i}", "worker", "--engine", "echo", "--concurrency", str(THREADS)) for i in range(2)]
        wait_workers(api_url, 2, engine="echo", headers=admin_headers(env))
        ids: list[str] = []
        recoveries: list[float] = []
        serving: list[int] = []
        with httpx.Client(base_url=api_url, timeout=30, headers=admin_headers(env)) as http:
            for _ in range(restarts):
                # Given jobs running that will outlast the outage, and workers waiting for more
                spanning = submit(http, SPANNING_JOBS, sleep_ms=int(outage_s * 1000) + 2000)
                ids += spanning
                wait_running(server.url, prefix, spanning, at_least=SPANNING_JOBS)
                # When Redis goes away for a while and comes back with what it held
                server.stop()
                time.sleep(outage_s)
                server.start()
                back = time.monotonic()
                # Then bursts that need both workers run, until each worker has run one
                seen = serve_until_both(http, server, prefix, ids, workers=workers, deadline=back + 60 + outage_s)
                recoveries.append(time.monotonic() - back)
                serving.append(len(seen))
                if len(seen) < 2:
                    break
        records = wait_all_ended(server.url, prefix, ids, timeout=60)
        tally(row, records)
        row.recovery_s = round(max(recoveries), 1)
        row.notes["recoveries_s"] = [round(r, 1) for r in recoveries]
        row.notes["workers_alive"] = sum(w.alive() for w in workers)
        row.notes["fewest_workers_serving_a_burst"] = min(serving)
        row.notes["worker_logs"] = {w.name: w.log_tail(15) for w in workers if not w.alive()}
    return row


def test_workers_outlive_redis_restarts_and_nothing_accepted_is_lost(test_env: dict[str, str], tmp_path: Path) -> None:
    row = scenario_redis_restarts(env=test_env, tmp_path=tmp_path, scale=1)
    assert row.notes["workers_alive"] == 2, row
    assert row.notes["fewest_workers_serving_a_burst"] == 2, row
    assert (row.lost, row.run_twice, row.wrongly_failed) == (0, 0, 0), row
