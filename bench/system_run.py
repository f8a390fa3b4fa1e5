"""The whole system under a saturating diffusion load: a worker for one max batch size, warmed
with one batch, then many jobs posted at once over HTTP; throughput, batch sizes and CPU
seconds read from the job records, the processes and the worker's log.

``bench/batching.py`` compares it with the bare pipeline; ``bench/webhooks.py`` runs it with
progress reporting on and off.
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import datetime
from typing import Any

import httpx
import redis

from blaze_jobs.stack import Stack, StackError
from blaze_jobs.store import Keys
from common import AUTH, cpu_seconds, submit_all, wait_ended
from pipelines import PROMPT  # keeps the Hugging Face hub offline

#: The line a worker logs for each batch it runs.
BATCH_LOG = re.compile(r"batch of \d+ ran in ([0-9.]+) s")


def job_body(*, size: int, steps: int, seed: int, index: int) -> dict[str, Any]:
    return {
        "engine": "diffusion",
        "input": {
            "prompt": f"{PROMPT}, study {index}",
            "width": size,
            "height": size,
            "num_inference_steps": steps,
            # As the raw call has it (SDXL's own default is 5.0, Stable Diffusion's 7.5).
            "guidance_scale": 7.5,
            "seed": seed,
        },
    }


def fetch_jobs(api_url: str, ids: list[str]) -> list[dict[str, Any]]:
    with httpx.Client(base_url=api_url, timeout=30, headers=AUTH) as client:
        return [client.get(f"/v1/jobs/{job_id}").raise_for_status().json() for job_id in ids]


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def system_figures(jobs: list[dict[str, Any]], *, posted_at: float) -> dict[str, Any]:
    """Throughput and batch figures from the job records."""
    ok = [j for j in jobs if j["status"] == "succeeded"]
    figures: dict[str, Any] = {"jobs": len(jobs), "succeeded": len(ok), "failed": len(jobs) - len(ok)}
    if not ok:
        return figures
    images = sum(len(j["output"]["images"]) for j in ok)
    first_start = min(_ts(j["started_at"]) for j in ok)
    last_end = max(_ts(j["completed_at"]) for j in ok)
    sizes = [j["metrics"]["batch_size"] or 1 for j in ok]
    batches = sum(1 / s for s in sizes)
    figures.update(
        images=images,
        span_s=round(last_end - first_start, 4),
        images_per_s=images / (last_end - first_start),
        # From the first POST to the last job's end: the span plus the first batch's fill.
        images_per_s_from_submit=images / (last_end - posted_at),
        batches=round(batches, 2),
        # Per batch: every batch of size s holds s jobs, so sum(1/s) counts the batches.
        mean_batch=len(sizes) / batches,
        # Per job (what the mean of metrics.batch_size is): leans towards the larger batches.
        mean_batch_per_job=sum(sizes) / len(sizes),
        batch_sizes={str(s): sizes.count(s) for s in sorted(set(sizes))},
        first_queue_s=round(min(j["metrics"]["queue_time_s"] or 0 for j in ok), 4),
    )
    return figures


def run_system(
    stack: Stack,
    *,
    api_url: str,
    api_pid: int,
    client: redis.Redis,
    keys: Keys,
    batch: int,
    args: argparse.Namespace,
    threads: int,
    factor: int,
    seed: int,
) -> dict[str, Any]:
    """Start a worker for ``batch`` with ``factor``×``batch`` task threads, warm it with one
    batch, then measure a saturating load."""
    argv = [
        "worker",
        "--engine",
        "diffusion",
        "--device",
        args.device,
        "--max-batch",
        str(batch),
        "--max-wait-ms",
        f"{args.max_wait_ms:g}",
    ]
    argv += ["--concurrency", str(batch * factor)]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    worker = stack.blaze(f"worker-b{batch}-t{threads}-c{factor}", *argv, **env)
    try:
        # 1. Warm-up: one batch, which also tells that the worker has loaded its model.
        warm = [job_body(size=args.size, steps=args.steps, seed=seed + i, index=i) for i in range(batch)]
        started = time.monotonic()
        ids = submit_all(api_url, warm)
        wait_ended(client, keys, ids, worker=worker, timeout=args.timeout)
        warm_jobs = fetch_jobs(api_url, ids)
        if any(j["status"] != "succeeded" for j in warm_jobs):
            bad = next(j for j in warm_jobs if j["status"] != "succeeded")
            raise StackError(f"a warm-up job {bad['status']}: {bad['error']}\n{worker.log_tail()}")
        print(f"  worker ready and warm after {time.monotonic() - started:.1f} s", flush=True)

        # 2. The measured load: many more jobs than one batch, all posted at once.
        count = batch * args.jobs_per_batch
        bodies = [job_body(size=args.size, steps=args.steps, seed=seed + batch + i, index=i) for i in range(count)]
        cpu_before = {"worker": cpu_seconds(worker.pid), "api": cpu_seconds(api_pid)}
        posted_at = time.time()
        ids = submit_all(api_url, bodies)
        wait_ended(client, keys, ids, worker=worker, timeout=args.timeout)
        cpu_after = {"worker": cpu_seconds(worker.pid), "api": cpu_seconds(api_pid)}
        jobs = fetch_jobs(api_url, ids)
    finally:
        worker.stop()
    figures = system_figures(jobs, posted_at=posted_at)
    # CPU seconds each process spent from the first POST until every job had ended: on a
    # shared CPU this tells the worker's own cost apart from time lost waiting for a core.
    cpu_s: dict[str, float | None] = {}
    for name, before in cpu_before.items():
        after = cpu_after[name]
        cpu_s[name] = round(after - before, 3) if after is not None and before is not None else None
    figures["cpu_s"] = cpu_s
    # The worker logs each batch's device time: the measured ones follow the warm-up batch.
    device_s = [float(m.group(1)) for m in BATCH_LOG.finditer(worker.log_path.read_text(errors="replace"))][1:]
    figures["device_s_per_batch"] = round(sum(device_s) / len(device_s), 4) if device_s else None
    # The device's busy fraction under the load: its batches' time over the span they ran in.
    span = figures.get("span_s")
    figures["device_busy"] = round(sum(device_s) / span, 4) if device_s and span else None
    failures = [j for j in jobs if j["status"] != "succeeded"]
    if failures:
        figures["failure_sample"] = failures[0]["error"]
    return figures
