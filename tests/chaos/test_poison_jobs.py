"""Poison jobs: a handful of jobs that fault every worker they meet, among hundreds of
healthy ones on two echo workers. A job that faults on two workers is the job's fault, not
the workers': it fails as the request's, naming both, and opens no breaker, so the healthy
jobs queue no longer than in a run without it.

The breaker here opens after two faults in a row and cools down for a minute: one opened
breaker would show in the healthy jobs' queue times and in ``GET /v1/workers``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from blaze_jobs.stack import Stack
from tests.chaos.harness import PrivateRedis, Row, admin_headers, redis_and_api, tally, wait_all_ended, wait_workers

pytestmark = pytest.mark.timeout(240)

#: Task threads per worker: few, so that a poison job requeued at the front of the queue
#: (as before) is drawn again at once by the worker it just faulted.
THREADS = 2
#: Healthy jobs take a moment, so that the queue stays long while the poison jobs fault.
HEALTHY_SLEEP_MS = 20
#: Long next to the whole run: a breaker that opened shows in the queue times.
COOLDOWN_S = 60
BREAKER = {
    "BLAZE_BREAKER_FAILURES": "2",
    "BLAZE_BREAKER_COOLDOWN_S": str(COOLDOWN_S),
    "BLAZE_MAX_ATTEMPTS": "3",
    # Beats each second: the workers see each other, and GET /v1/workers is fresh.
    "BLAZE_LEASE_S": "3",
}


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] if ordered else 0.0


def submit(http: httpx.Client, inputs: list[dict[str, Any]]) -> list[str]:
    ids = []
    for job_input in inputs:
        response = http.post("/v1/jobs", json={"engine": "echo", "input": job_input})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def run_wave(http: httpx.Client, server: PrivateRedis, prefix: str, *, healthy: int, poison: int) -> dict[str, Any]:
    """Submit ``healthy`` jobs with ``poison`` ones spread evenly among them; wait for all."""
    inputs: list[dict[str, Any]] = [{"n": n, "sleep_ms": HEALTHY_SLEEP_MS} for n in range(healthy)]
    for k in range(poison):
        inputs.insert((k + 1) * len(inputs) // (poison + 1), {"fail": "worker", "k": k})
    ids = submit(http, inputs)
    records = wait_all_ended(server.url, prefix, ids, timeout=COOLDOWN_S * 0.75)
    now = time.time()
    is_poison = {job_id: "fail" in job_input for job_id, job_input in zip(ids, inputs, strict=True)}
    healthy_records = {i: r for i, r in records.items() if not is_poison[i]}
    # A job still waiting has waited until now, at least.
    queue_times = [float(r.get("started_at") or now) - float(r["created_at"]) for r in healthy_records.values() if r]
    return {
        "healthy": healthy_records,
        "poison": {i: r for i, r in records.items() if is_poison[i]},
        "p99_queue_s": round(p99(queue_times), 3),
    }


def scenario_poison_jobs(*, env: dict[str, str], tmp_path: Path, scale: int) -> Row:
    """``300 × scale`` healthy jobs (at most 1,000) with ``6 × scale`` poison ones (at most
    10) on two workers, after a run of the same healthy jobs alone for comparison."""
    healthy, poison = min(1000, 300 * scale), min(10, 6 * scale)
    prefix = "blaze-chaos-poison:"
    row = Row("poison_jobs", notes={"healthy": healthy, "poison": poison})
    with Stack(env=env, log_dir=tmp_path) as stack:
        server, api_url = redis_and_api(stack, tmp_path, prefix=prefix, **BREAKER)
        workers = [stack.blaze(f"worker-{i}", "worker", "--engine", "echo", "--concurrency", str(THREADS)) for i in range(2)]
        wait_workers(api_url, 2, engine="echo", headers=admin_headers(env))
        with httpx.Client(base_url=api_url, timeout=30, headers=admin_headers(env)) as http:
            # Given the queue time of healthy jobs alone
            baseline = run_wave(http, server, prefix, healthy=healthy, poison=0)
            # When poison jobs come among as many healthy ones
            mixed = run_wave(http, server, prefix, healthy=healthy, poison=poison)
            time.sleep(2)  # two beats: GET /v1/workers shows every fault counted
            breakers = {w["name"]: w["breaker"] for w in http.get("/v1/workers").json()["workers"]}
        tally(row, {**baseline["healthy"], **mixed["healthy"]})
        names = [f"echo-{w.pid}@" for w in workers]
        row.notes.update(
            p99_queue_s_alone=baseline["p99_queue_s"],
            p99_queue_s_with_poison=mixed["p99_queue_s"],
            breakers_opened=sum(b["times_opened"] for b in breakers.values()),
            poison_failed_as_request=sum(
                r.get("status") == "failed" and json.loads(r.get("error") or "{}").get("type") == "request"
                for r in mixed["poison"].values()
            ),
            poison_naming_both_workers=sum(all(n in r.get("error", "") for n in names) for r in mixed["poison"].values()),
            poison_attempts=sorted(int(r.get("attempts") or 0) for r in mixed["poison"].values()),
        )
    return row


def test_poison_jobs_fail_as_their_own_fault_and_healthy_jobs_do_not_wait_for_breakers(
    test_env: dict[str, str], tmp_path: Path
) -> None:
    row = scenario_poison_jobs(env=test_env, tmp_path=tmp_path, scale=1)
    # Every healthy job succeeded at its first attempt
    assert (row.lost, row.run_twice, row.wrongly_failed) == (0, 0, 0), row
    # every poison job failed as the request's fault, naming both workers it faulted on
    poison = row.notes["poison"]
    assert row.notes["poison_failed_as_request"] == poison, row
    assert row.notes["poison_naming_both_workers"] == poison, row
    # no breaker opened, and no healthy job waited anything like a cool-down
    assert row.notes["breakers_opened"] == 0, row
    assert row.notes["p99_queue_s_with_poison"] < COOLDOWN_S / 2, row
