"""What the end-to-end benchmarks share: a private key prefix, the real API as a child
process, latency percentiles, a description of the machine, and the JSON summary.

Run the benchmarks as scripts (``python bench/batching.py``): this module and
``bench/submit.py`` are imported from the script's own folder.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import redis

from blaze_jobs.stack import Child, Stack, StackError, free_port
from blaze_jobs.store import Keys
from submit import cpu_seconds, forget  # noqa: F401  (re-exported for the benchmarks)

HOST = "127.0.0.1"
#: The admin token the benchmarks' API runs with (``start_api``) and their own requests send
#: (``AUTH``): a fresh one each run, so a benchmark needs no key set up beforehand.
ADMIN_TOKEN = f"bench-{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
#: Packages whose versions a summary records, so figures from two runs can be compared.
PACKAGES = ("blaze-jobs", "celery", "kombu", "redis", "fastapi", "uvicorn", "torch", "diffusers", "transformers")


def unique_prefix(name: str) -> str:
    """A Redis key prefix no other run (or deployment sharing the Redis) uses."""
    return f"blaze-bench-{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}:"


def start_api(stack: Stack, *, timeout: float = 60, name: str = "api", **env: str) -> tuple[Child, str]:
    """``blaze api`` on a free port, with the stack's environment, ``ADMIN_TOKEN`` and ``env``
    (``BLAZE_METRICS="off"``); returns it and its URL once ready."""
    port = free_port()
    api = stack.blaze(name, "api", "--port", str(port), **{"BLAZE_ADMIN_TOKEN": ADMIN_TOKEN, **env})
    url = f"http://{HOST}:{port}"
    stack.wait_http("the API", api, f"{url}/readyz", timeout=timeout)
    return api, url


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank of an ascending sequence, as ``bench/loadgen.py`` computes it."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99, mean, min and max of latencies given in seconds, in milliseconds."""
    ordered = sorted(seconds)
    if not ordered:
        return {"n": 0}
    ms = [v * 1000 for v in ordered]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 3),
        "p90_ms": round(percentile(ms, 0.90), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "mean_ms": round(sum(ms) / len(ms), 3),
        "min_ms": round(ms[0], 3),
        "max_ms": round(ms[-1], 3),
    }


def machine() -> dict[str, Any]:
    """Where the figures came from: CPUs, load, Python and package versions."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {},
    }
    for name in PACKAGES:
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return info


def write_json(path: str | None, summary: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}", flush=True)


def broke_off(script: str, error: BaseException, summary: dict[str, Any], json_path: str | None) -> int:
    """Say why a benchmark run broke off, keep that in its JSON summary; the exit status 1."""
    print(f"{script}: {error}", file=sys.stderr)
    summary["error"] = str(error)
    write_json(json_path, summary)
    return 1


def forget_all(client: redis.Redis | None, *prefixes: str) -> None:
    """Delete every key a run wrote under ``prefixes`` (as far as Redis lets), then close."""
    if client is None:
        return
    try:
        for prefix in prefixes:
            forget(client, prefix)
    except redis.RedisError:
        pass
    finally:
        client.close()


ENDED = {"succeeded", "failed", "canceled"}


def wait_ended(
    client: redis.Redis, keys: Keys, ids: list[str], *, worker: Child, timeout: float, poll_s: float = 0.25
) -> list[str]:
    """Block until every job has ended, reading only their status fields (one round trip
    every ``poll_s``, so the waiting costs the machine nothing measurable); their statuses."""
    deadline = time.monotonic() + timeout
    while True:
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.job(job_id), "status")
            statuses = [s.decode() if s else "missing" for s in pipe.execute()]
        if all(s in ENDED or s == "missing" for s in statuses):
            return statuses
        if not worker.alive():
            raise StackError(f"the worker exited with code {worker.process.returncode}:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            counts = {s: statuses.count(s) for s in set(statuses)}
            raise StackError(f"jobs not ended after {timeout:.0f} s: {counts}\n{worker.log_tail()}")
        time.sleep(poll_s)


async def _post_all(api_url: str, bodies: list[dict[str, Any]]) -> list[str]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=api_url, timeout=60, limits=limits, headers=AUTH) as client:
        responses = await asyncio.gather(*(client.post("/v1/jobs", json=body) for body in bodies))
    refused = [r for r in responses if r.status_code != 202]
    if refused:
        raise RuntimeError(
            f"{len(refused)} of {len(bodies)} submissions refused; first: {refused[0].status_code} {refused[0].text[:300]}"
        )
    return [r.json()["id"] for r in responses]


def submit_all(api_url: str, bodies: list[dict[str, Any]]) -> list[str]:
    """Post every body at once (concurrent connections); the job ids, in order."""
    return asyncio.run(_post_all(api_url, bodies))
