"""No job is lost: a worker killed mid-batch, a message delivered twice, Redis restarting
under load. Each story ends with every accepted job ending once, with one result."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from blaze_jobs.broker import queue_key, task_message
from blaze_jobs.client import BlazeClient
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack, free_port, redis_reachable, redis_server_binary
from tests.conftest import start_api, wait_for_workers, wait_until

LEASE_S = 3
LEASE = {"BLAZE_LEASE_S": str(LEASE_S)}
#: A job of a dead worker goes back to the queue within about its lease and two of the
#: reaper's beats (a third of the lease each); six times that leaves room for a busy machine.
HANDED_BACK_WITHIN_S = 6 * (LEASE_S + 2 * LEASE_S / 3)


@pytest.mark.timeout(240)
def test_jobs_of_a_worker_killed_mid_batch_run_again_on_a_live_worker(own_stack: Stack) -> None:
    # Given a diffusion worker running a batch of four slow jobs, with 3 s leases, and a
    # live worker of another engine (any worker hands back jobs whose worker died)
    api_url = start_api(own_stack, **LEASE)
    own_stack.blaze("echo", "worker", "--engine", "echo", "--concurrency", "1", **LEASE)
    doomed = own_stack.blaze("doomed", "worker", "--engine", "diffusion", "--max-batch", "4", "--max-wait-ms", "1000", **LEASE)
    wait_for_workers(api_url, 2)
    with BlazeClient(api_url) as client:
        request = {"prompt": "a storm", "num_inference_steps": 20}
        ids = [client.submit("diffusion", {**request, "seed": n})["id"] for n in range(4)]
        wait_until(lambda: all(client.get(i)["status"] == "running" for i in ids), timeout=60, what="the batch to start")

        # When the worker is killed with SIGKILL in the middle of the batch
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(timeout=10)

        # Then, the lease run out, every job is back in the queue
        wait_until(
            lambda: all(client.get(i)["status"] == "queued" for i in ids),
            timeout=HANDED_BACK_WITHIN_S,
            what="the jobs handed back",
        )
        # and a live diffusion worker runs each to exactly one result
        own_stack.blaze("survivor", "worker", "--engine", "diffusion", "--max-batch", "4", **LEASE)
        for job in [client.wait(i, timeout=150) for i in ids]:
            assert job["status"] == "succeeded", job["error"]
            assert job["attempts"] == 2 and len(job["output"]["images"]) == 1
            assert job["worker"].startswith("diffusion-") and f"-{doomed.pid}@" not in job["worker"]


@pytest.mark.timeout(90)
def test_a_message_delivered_twice_runs_the_job_once(own_stack: Stack, settings: Settings) -> None:
    # Given an echo job that has run
    api_url = start_api(own_stack)
    own_stack.blaze("echo", "worker", "--engine", "echo", "--concurrency", "1")
    wait_for_workers(api_url, 1)
    prefix = own_stack.env["BLAZE_REDIS_PREFIX"]
    with BlazeClient(api_url) as client:
        job = client.wait(client.submit("echo", {"once": True})["id"], timeout=30)
        assert job["status"] == "succeeded"

        # When its Celery message arrives again (as after a broker redelivery)
        queued = Settings(redis_url=settings.redis_url, redis_prefix=prefix)
        message = task_message(job_id=job["id"], engine="echo", input=job["input"])
        with redis.Redis.from_url(settings.redis_url) as r:
            r.lpush(queue_key(queued, "echo"), message)
        # and a later job shows the worker has consumed it
        assert client.wait(client.submit("echo", {"after": True})["id"], timeout=30)["status"] == "succeeded"

        # Then the job is unchanged: it did not run a second time
        assert client.get(job["id"]) == job


@pytest.mark.timeout(180)
def test_redis_restarting_under_load_loses_no_accepted_job(own_stack: Stack, tmp_path: Path) -> None:
    # Given a Redis that persists every write, an API and two echo workers on it
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    data = tmp_path / "redis-data"
    data.mkdir()
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    argv += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    server = own_stack.start("redis", argv)
    own_stack.wait_for("redis", server, lambda: redis_reachable(url), timeout=15)
    # A message taken from Redis just before it stopped comes back after the visibility timeout.
    env = {"BLAZE_REDIS_URL": url, "BLAZE_VISIBILITY_TIMEOUT_S": "5"}
    api_url = start_api(own_stack, **env)
    for n in range(2):
        own_stack.blaze(f"echo-{n}", "worker", "--engine", "echo", "--concurrency", "4", **env)
    wait_for_workers(api_url, 2)

    accepted: list[str] = []
    with BlazeClient(api_url, timeout=10) as client:
        # When jobs keep arriving while Redis stops and starts again
        for n in range(30):
            accepted.append(client.submit("echo", {"n": n, "sleep_ms": 100})["id"])
        server.stop()
        time.sleep(1)
        server = own_stack.start("redis-again", argv)
        own_stack.wait_for("redis again", server, lambda: redis_reachable(url), timeout=15)

        def submit_after_restart() -> str | None:
            try:
                return client.submit("echo", {"after": True})["id"]
            except Exception:
                return None

        accepted.append(wait_until(submit_after_restart, timeout=30, what="the API to accept jobs again", interval=0.2))
        for n in range(10):
            accepted.append(client.submit("echo", {"n": 100 + n})["id"])

        # Then every accepted job completes, once
        for job_id in accepted:
            job = client.wait(job_id, timeout=90)
            assert job["status"] == "succeeded", (job_id, job["status"], job["error"])
            assert job["attempts"] >= 1
