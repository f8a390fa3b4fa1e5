"""What every fault test shares: a Redis server of the test's own (on a fixed free port, so
it can be stopped, restarted, paused and reconfigured by its pid), a stack of real Blaze
Jobs processes pointed at it, and the durability row each scenario reports: jobs accepted,
lost, run twice, wrongly failed, and the time to recover.

Scenarios are plain functions taking a ``scale`` (``tests/chaos/test_*.py`` run them small
in CI; ``bench/chaos.py`` runs them longer and prints the table). Everything aims at
127.0.0.1 only, every loop is bounded in count and time, and every process is stopped by
its own pid when the stack closes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from blaze_jobs.stack import Child, Stack, StackError, free_port, redis_reachable, redis_server_binary

ENDED = ("succeeded", "failed", "canceled")


class PrivateRedis:
    """A redis-server on a port of its own, started and stopped by pid. ``persist`` keeps an
    append-only file in ``data_dir`` across restarts, as a deployment's Redis does."""

    def __init__(self, stack: Stack, *, data_dir: Path, persist: bool = True, options: Iterable[str] = ()) -> None:
        self.stack = stack
        self.data_dir = data_dir
        self.persist = persist
        self.options = list(options)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.child: Child | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir)]
        argv += ["--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.child = self.stack.start(f"redis-{self.starts}", [*argv, *self.options])
        self.stack.wait_for("redis", self.child, lambda: self._ready(), timeout=30)

    def _ready(self) -> bool:
        if not redis_reachable(self.url, timeout=0.2):
            return False
        try:
            with redis.Redis.from_url(self.url, socket_timeout=1) as client:
                return client.info("persistence").get("loading", 0) == 0
        except redis.RedisError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL with ``kill``: nothing flushed beyond what fsync wrote)."""
        assert self.child is not None
        if kill:
            self.child.process.kill()
            self.child.process.wait(timeout=10)
        else:
            self.child.stop(grace=10)
        deadline = time.monotonic() + 10
        while redis_reachable(self.url, timeout=0.2) and time.monotonic() < deadline:
            time.sleep(0.05)

    def pause(self) -> None:
        assert self.child is not None
        os.kill(self.child.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.child is not None
        os.kill(self.child.pid, signal.SIGCONT)

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, **options)


@dataclass
class Row:
    """One scenario's outcome, in what a user counts."""

    scenario: str
    accepted: int = 0
    lost: int = 0
    run_twice: int = 0
    wrongly_failed: int = 0
    recovery_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def chaos_env(base: dict[str, str], *, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a fault test's processes: its own Redis and key prefix."""
    return {**base, "BLAZE_REDIS_URL": redis_url, "BLAZE_REDIS_PREFIX": prefix, **extra}


def admin_headers(env: Mapping[str, str]) -> dict[str, str]:
    """What a scenario's own requests to its API send: the admin token that API runs with
    (``BLAZE_ADMIN_TOKEN`` of ``env``: the tests' token, or the one ``bench/chaos.py`` makes)."""
    token = env.get("BLAZE_ADMIN_TOKEN")
    if not token:
        raise AssertionError("the scenario's environment sets no BLAZE_ADMIN_TOKEN: its API would refuse every request")
    return {"Authorization": f"Bearer {token}"}


def wait_http(stack: Stack, child: Child, url: str, *, timeout: float = 60) -> None:
    try:
        stack.wait_http(child.name, child, url, timeout=timeout)
    except StackError as error:
        raise AssertionError(str(error)) from None


def wait_workers(
    api_url: str, count: int, *, headers: Mapping[str, str], timeout: float = 120, engine: str | None = None
) -> list[dict[str, Any]]:
    """Wait until ``GET /v1/workers`` lists ``count`` workers (of ``engine``, if given);
    ``headers`` carry the key (``admin_headers``)."""
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            seen = httpx.get(f"{api_url}/v1/workers", timeout=5, headers=headers).json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            seen = []
        matching = [w for w in seen if engine is None or w.get("engine") == engine]
        if len(matching) >= count:
            return matching
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {count} workers; saw {seen!r}")


def read_jobs(redis_url: str, prefix: str, ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """The job records straight from Redis (empty dict for a job that is gone)."""
    ids = list(ids)
    with redis.Redis.from_url(redis_url, socket_timeout=10, decode_responses=True) as client:
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(f"{prefix}job:{job_id}")
            records = pipe.execute()
    return dict(zip(ids, records, strict=True))


def wait_all_ended(redis_url: str, prefix: str, ids: Iterable[str], *, timeout: float) -> dict[str, dict[str, str]]:
    """Poll until every job has ended (or is gone); returns the records as last seen."""
    ids = list(ids)
    deadline = time.monotonic() + timeout
    records: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        try:
            records = read_jobs(redis_url, prefix, ids)
        except redis.RedisError:
            time.sleep(0.5)
            continue
        if all(not r or r.get("status") in ENDED for r in records.values()):
            return records
        time.sleep(0.25)
    return records


def tally(row: Row, records: dict[str, dict[str, str]], *, expect_attempts: int = 1) -> Row:
    """Count what the user cares about: lost (gone, or never ended), run twice (started more
    often than ``expect_attempts``), wrongly failed (failed or canceled though healthy)."""
    row.accepted = len(records)
    for record in records.values():
        status = record.get("status")
        if not record or status not in ENDED:
            row.lost += 1
        elif status != "succeeded":
            row.wrongly_failed += 1
        if record and int(record.get("attempts") or 0) > expect_attempts:
            row.run_twice += 1
    statuses: dict[str, int] = {}
    for record in records.values():
        statuses[record.get("status", "gone")] = statuses.get(record.get("status", "gone"), 0) + 1
    row.notes["statuses"] = statuses
    return row


def wait_running(redis_url: str, prefix: str, ids: Iterable[str], *, at_least: int, timeout: float = 30) -> None:
    """Poll until at least ``at_least`` of the jobs are running."""
    ids = list(ids)
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = sum(r.get("status") == "running" for r in read_jobs(redis_url, prefix, ids).values())
        if seen >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"{seen} of {len(ids)} jobs running after {timeout} s; wanted {at_least}")


def redis_and_api(stack: Stack, tmp_path: Path, *, prefix: str, **extra: str) -> tuple[PrivateRedis, str]:
    """Start a persistent private Redis and ``blaze api`` on it in ``stack``, under ``prefix``
    and with ``extra`` settings (which every process started in ``stack`` afterwards shares);
    returns the Redis and the API's URL once it is ready."""
    server = PrivateRedis(stack, data_dir=tmp_path / "redis", persist=True)
    server.start()
    stack.env.update(chaos_env(stack.env, redis_url=server.url, prefix=prefix, **extra))
    port = free_port()
    api = stack.blaze("api", "api", "--port", str(port))
    api_url = f"http://127.0.0.1:{port}"
    wait_http(stack, api, f"{api_url}/readyz")
    return server, api_url
