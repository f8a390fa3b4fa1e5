"""A Redis outage longer than the lease, while two echo workers run long jobs: no job is
handed to another worker while its own worker lives and runs it, no finished job is failed,
nothing accepted is lost.

Leases run out inside Redis while it is away (nobody can renew them there). The workers
recreate their own on their first beat once Redis is back, and the one elected reaper waits a
lease after it reaches Redis again before it believes a missing lease. The Redis here
persists (append-only, fsync always), as a deployment's does, so the job records survive."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from blaze_jobs.stack import Stack
from tests.chaos.harness import Row, admin_headers, redis_and_api, tally, wait_all_ended, wait_running, wait_workers

pytestmark = pytest.mark.timeout(240)

#: Seconds a lease lasts: short, so an outage of more than two leases stays short too.
LEASE_S = 3.0
#: Task threads per worker, each running one long job; one more takes the probe after an outage.
THREADS = 3


def create(http: httpx.Client, job_input: dict, *, timeout: float = 30) -> str:
    """Create an echo job, retrying while the API answers 503 or not at all (Redis coming back)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = http.post("/v1/jobs", json={"engine": "echo", "input": job_input})
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 202:
            return response.json()["id"]
        assert response is None or response.status_code == 503, response.text
        assert time.monotonic() < deadline, f"POST /v1/jobs kept failing: {response and response.text}"
        time.sleep(0.2)


def scenario_lease_outage(*, env: dict[str, str], tmp_path: Path, scale: int) -> Row:
    """``scale`` outages (at most 5) of 2.5 leases each, every one while ``2 × THREADS`` jobs
    run on the two workers, each job sleeping through the outage and a bit beyond."""
    outages, outage_s = min(5, scale), 2.5 * LEASE_S
    sleep_ms = int((outage_s + LEASE_S) * 1000)
    prefix = "blaze-chaos-lease-outage:"
    row = Row("lease_outage", notes={"outages": outages, "outage_s": outage_s, "lease_s": LEASE_S, "job_s": sleep_ms / 1000})
    with Stack(env=env, log_dir=tmp_path) as stack:
        server, api_url = redis_and_api(stack, tmp_path, prefix=prefix, BLAZE_LEASE_S=str(LEASE_S))
        workers = [stack.blaze(f"worker-{i}", "worker", "--engine", "echo", "--concurrency", str(THREADS + 1)) for i in range(2)]
        wait_workers(api_url, 2, engine="echo", headers=admin_headers(env))
        ids: list[str] = []
        recoveries: list[float] = []
        with httpx.Client(base_url=api_url, timeout=30, headers=admin_headers(env)) as http:
            for n in range(outages):
                # Given long jobs running on both workers
                burst = [create(http, {"round": n, "job": i, "sleep_ms": sleep_ms}) for i in range(2 * THREADS)]
                ids += burst
                wait_running(server.url, prefix, burst, at_least=len(burst), timeout=60)
                # When Redis goes away for more than two leases and comes back with what it held
                server.stop()
                time.sleep(outage_s)
                server.start()
                back = time.monotonic()
                # Then a new job runs (the fleet serves again), and every job of the burst ends
                probe = create(http, {"round": n, "probe": True})
                ids.append(probe)
                ended = wait_all_ended(server.url, prefix, [probe], timeout=60)
                if ended[probe].get("status") == "succeeded":
                    recoveries.append(time.monotonic() - back)
                wait_all_ended(server.url, prefix, burst, timeout=sleep_ms / 1000 + 60)
        records = wait_all_ended(server.url, prefix, ids, timeout=30)
        tally(row, records)
        row.recovery_s = round(max(recoveries), 1) if recoveries else None
        row.notes["workers_alive"] = sum(w.alive() for w in workers)
        row.notes["errors"] = sorted({r["error"] for r in records.values() if r.get("error")})
        row.notes["worker_logs"] = {w.name: w.log_tail(15) for w in workers if not w.alive()}
    return row


def test_an_outage_of_two_leases_reruns_no_job_of_a_live_worker_and_fails_none(test_env: dict[str, str], tmp_path: Path) -> None:
    row = scenario_lease_outage(env=test_env, tmp_path=tmp_path, scale=1)
    assert row.notes["workers_alive"] == 2, row
    assert (row.lost, row.run_twice, row.wrongly_failed) == (0, 0, 0), row
    assert row.recovery_s is not None, row
