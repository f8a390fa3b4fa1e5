"""A webhook worker killed (SIGKILL) while its deliveries are in flight: another webhook
worker sends them again once their in-flight deadline passes (the receiver's timeout plus
``BLAZE_WEBHOOK_ATTEMPT_MARGIN_S``), long before Redis's visibility timeout would hand their
messages back, and records each on its job. No delivery is lost, and none reaches the
receiver more often than the dead worker forces (once more for each it was sending)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from blaze_jobs.webhook_retries import RETRY_POLL_S
from tests.chaos.harness import Row, admin_headers, redis_and_api, wait_workers
from tests.receiver import Answer, Receiver

pytestmark = pytest.mark.timeout(240)

#: The receiver's time to answer in this scenario: long enough that the kill surely comes
#: while the held requests wait for their answer.
TIMEOUT_S = 5.0
#: What a receiver that holds a request does: answer long after the sender gave up.
HOLD_S = 120.0
#: Allowance for the second webhook worker to start and consume on a busy 2-core machine.
START_S = 45.0


def deliveries_by_id(receiver: Receiver, paths: list[str]) -> dict[str, list[float]]:
    """When each webhook-id reached the receiver, on any of ``paths``."""
    seen: dict[str, list[float]] = {}
    for path in paths:
        for request in receiver.received(path):
            seen.setdefault(request.headers["webhook-id"], []).append(request.at)
    return seen


def submit(http: httpx.Client, receiver: Receiver, path: str, n: int) -> str:
    body = {"engine": "echo", "input": {"n": n}, "webhook": receiver.url(path), "webhook_events_filter": ["completed"]}
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def scenario_webhook_worker_death(*, env: dict[str, str], tmp_path: Path, scale: int) -> Row:
    """``3 × scale`` deliveries (at most 16, one worker's threads) in flight when their
    webhook worker is killed, and ``2 × scale`` more whose jobs end while no webhook worker
    runs; a second webhook worker is started at once."""
    held, later = min(16, 3 * scale), 2 * scale
    # The processes' settings: the environment they get names only the timeout.
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    deadline_s = TIMEOUT_S + defaults["webhook_attempt_margin_s"]
    bound_s = deadline_s + RETRY_POLL_S + START_S
    prefix = "blaze-chaos-webhooks:"
    row = Row(
        "webhook_worker_death",
        notes={
            "unit": "deliveries",
            "in_flight_at_kill": held,
            "bound_s": bound_s,
            "visibility_timeout_s": defaults["visibility_timeout_s"],
        },
    )
    receiver = Receiver()
    try:
        with Stack(env=env, log_dir=tmp_path) as stack:
            _, api_url = redis_and_api(stack, tmp_path, prefix=prefix, BLAZE_WEBHOOK_TIMEOUT_S=str(TIMEOUT_S))
            stack.blaze("worker-echo", "worker", "--engine", "echo", "--concurrency", "2")
            first = stack.blaze("webhooks-1", "worker", "--engine", "webhooks")
            wait_workers(api_url, 1, engine="echo", headers=admin_headers(env))
            with httpx.Client(base_url=api_url, timeout=30, headers=admin_headers(env)) as http:
                # Given jobs whose completion webhooks the receiver holds without answering
                held_paths = [f"/held/{n}" for n in range(held)]
                for path in held_paths:
                    receiver.answer(path, Answer(200, delay_s=HOLD_S))
                jobs = {submit(http, receiver, path, n): path for n, path in enumerate(held_paths)}
                for path in held_paths:
                    receiver.wait_for(path, 1, timeout=90)

                # When the webhook worker dies mid-delivery, and another one starts
                os.kill(first.pid, signal.SIGKILL)
                first.process.wait(timeout=10)
                killed_at = time.time()
                sent_before = deliveries_by_id(receiver, held_paths)
                stack.blaze("webhooks-2", "worker", "--engine", "webhooks")
                # (and more jobs end while it starts: their deliveries wait in the queue)
                later_paths = [f"/later/{n}" for n in range(later)]
                jobs.update({submit(http, receiver, path, held + n): path for n, path in enumerate(later_paths)})

                # Then every delivery reaches the receiver within the bound
                paths = held_paths + later_paths
                give_up = time.monotonic() + bound_s
                while time.monotonic() < give_up and not all(len(receiver.received(p)) >= 1 + (p in held_paths) for p in paths):
                    time.sleep(0.1)
                arrived = deliveries_by_id(receiver, paths)
                resent = [times[-1] - killed_at for wid, times in arrived.items() if wid in sent_before and len(times) > 1]
                row.recovery_s = round(max(resent), 1) if resent else None

                # and is recorded on its job, the lost attempt with it
                records: dict[str, list[dict[str, Any]]] = {}
                settle = time.monotonic() + 15
                while time.monotonic() < settle:
                    records = {job: http.get(f"/v1/jobs/{job}/deliveries").json()["deliveries"] for job in jobs}
                    if all(d and d[0]["state"] not in ("pending", "retrying") for d in records.values()):
                        break
                    time.sleep(0.2)
            time.sleep(1.0)  # a duplicate sent late would arrive by now
            arrived = deliveries_by_id(receiver, paths)
    finally:
        receiver.close()

    row.accepted = len(jobs)
    for job in jobs:
        (delivery,) = records[job] or [{"state": "missing", "webhook_id": None, "attempts": []}]
        times = arrived.get(delivery["webhook_id"], [])
        forced = len(sent_before.get(delivery["webhook_id"], []))
        if delivery["state"] != "succeeded" or len(times) <= forced:
            row.lost += 1
        elif len(times) > forced + 1:
            row.run_twice += 1
        if delivery["state"] == "failed":
            row.wrongly_failed += 1
    row.notes["lost_attempts_recorded"] = sum(
        1 for ds in records.values() for d in ds for a in d["attempts"] if "lost" in (a["error"] or "")
    )
    row.notes["states"] = sorted({d["state"] for ds in records.values() for d in ds})
    return row


def test_deliveries_in_flight_when_their_webhook_worker_dies_are_sent_again_soon(
    test_env: dict[str, str], tmp_path: Path
) -> None:
    row = scenario_webhook_worker_death(env=test_env, tmp_path=tmp_path, scale=1)
    assert (row.lost, row.run_twice, row.wrongly_failed) == (0, 0, 0), row
    assert row.recovery_s is not None and row.recovery_s <= row.notes["bound_s"], row
    assert row.recovery_s < row.notes["visibility_timeout_s"] / 4, row
    assert row.notes["lost_attempts_recorded"] == row.notes["in_flight_at_kill"], row
