"""What progress reporting costs diffusion throughput (part 2 of ``bench/webhooks.py``).

* engine: ``DiffusionEngine.run_batch`` in this process, each job's step callback wired to the
  real ``ProgressReporter`` (writing to Redis, jobs in ``running``) or to nothing, alternating
  call by call, and the reporter's own parts (a step callback; one send) timed directly;
* system: ``bench/system_run.py``'s saturating run with the worker's progress on and off,
  interleaved.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.progress import ProgressReporter
from blaze_jobs.settings import get_settings
from blaze_jobs.stack import Stack, StackError
from blaze_jobs.store import JobStore, Keys

PROMPT = "a lighthouse at dusk, oil on canvas"


def engine_progress_cost(
    *,
    pairs: int,
    batch: int,
    size: int,
    steps: int,
    prefix: str,
    redis_url: str,
    model: str,
    model_dir: Path,
    device: str,
    threads: int,
) -> dict[str, Any]:
    """``DiffusionEngine.run_batch`` with and without the progress reporter, alternating
    call by call (paired ratios), and the reporter's own cost measured directly."""
    from blaze_jobs.engines.base import EngineRequest
    from blaze_jobs.engines.diffusion import DiffusionEngine

    settings = get_settings().model_copy(update={"redis_prefix": prefix, "redis_url": redis_url})
    interval = settings.progress_interval_s or 0.5
    client = redis.Redis.from_url(redis_url)
    store = JobStore(client, settings)
    reporter = ProgressReporter(client, prefix=prefix, interval_s=interval)
    engine = DiffusionEngine(model_dir=model_dir, device=device)
    engine.prepare(model)
    if threads:
        import torch

        torch.set_num_threads(threads)
    seed = random.randrange(2**30)

    def running_job() -> str:
        job_id = str(uuid.uuid4())
        store.create(
            new_record(job_id=job_id, tenant="default", engine="diffusion", model=model, input={}, created_at=time.time())
        )
        store.transition(job_id, allowed=(JobStatus.queued,), to=JobStatus.running)
        return job_id

    def one(with_progress: bool) -> tuple[float, float]:
        """Wall and process-CPU seconds of one ``run_batch`` of ``batch`` jobs. Process CPU
        counts every torch thread and the reporter's thread, and a busy shared CPU blurs it
        far less than wall time."""
        nonlocal seed
        requests = []
        for i in range(batch):
            job_id = running_job()
            seed += 1
            data = {"prompt": f"{PROMPT}, {i}", "width": size, "height": size, "num_inference_steps": steps, "seed": seed}
            callback = reporter.callback(job_id) if with_progress else None
            requests.append(EngineRequest(job_id=job_id, model=model, input=data, on_progress=callback))
        wall, cpu = time.perf_counter(), time.process_time()
        results = engine.run_batch(requests)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if any(isinstance(r, BaseException) for r in results):
            raise RuntimeError(f"run_batch failed: {next(r for r in results if isinstance(r, BaseException))!r}")
        return wall, cpu

    # 1. A/B, call by call: each pair's ratio cancels most of the machine's drift.
    one(False), one(True)  # warm-up
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for p in range(pairs):
        for with_progress in (False, True) if p % 2 == 0 else (True, False):
            runs[with_progress].append(one(with_progress))
    wall_ratios = sorted(on[0] / off[0] for on, off in zip(runs[True], runs[False], strict=True))
    cpu_ratios = sorted(on[1] / off[1] for on, off in zip(runs[True], runs[False], strict=True))

    # 2. The reporter itself: a step callback, and one send (wake-up, Lua step, round trip).
    job_id = running_job()
    callback = reporter.callback(job_id)
    calls = 200_000
    cpu = time.process_time()
    for step in range(calls):
        callback(step, calls)
    callback_us = (time.process_time() - cpu) / calls * 1e6
    reporter.flush()
    sends = 300
    cpu = time.process_time()
    for step in range(sends):
        reporter.report(job_id, step, sends)
        reporter.flush()
    send_ms = (time.process_time() - cpu) / sends * 1000
    reporter.close()
    engine.close()
    client.close()

    wall_per_image = statistics.median(w for w, _ in runs[False]) / batch
    cpu_per_image = statistics.median(c for _, c in runs[False]) / batch
    # Per image: ``steps`` callbacks, and one send per interval of its batch's wall time.
    reporter_s_per_image = steps * callback_us / 1e6 + (wall_per_image * batch / interval) * send_ms / 1000 / batch
    return {
        "pairs": pairs,
        "images_per_s_off": batch / statistics.median(w for w, _ in runs[False]),
        "images_per_s_on": batch / statistics.median(w for w, _ in runs[True]),
        "wall_ratio_on_off": {
            "median": statistics.median(wall_ratios),
            "q1": wall_ratios[len(wall_ratios) // 4],
            "q3": wall_ratios[3 * len(wall_ratios) // 4],
        },
        "cpu_ratio_on_off": {
            "median": statistics.median(cpu_ratios),
            "q1": cpu_ratios[len(cpu_ratios) // 4],
            "q3": cpu_ratios[3 * len(cpu_ratios) // 4],
        },
        "cpu_s_per_image_off": cpu_per_image,
        "callback_us": callback_us,
        "send_ms_cpu": send_ms,
        "reporter_cpu_s_per_image": reporter_s_per_image,
        # What the reporter adds to an image's CPU time, from its measured parts.
        "cost": reporter_s_per_image / cpu_per_image,
    }


def system_progress_cost(stack: Stack, api_url: str, api_pid: int, *, rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    """``bench/batching.py``'s system run, worker with progress on and off, interleaved."""
    from system_run import run_system

    client = redis.Redis.from_url(stack.env["BLAZE_REDIS_URL"])
    keys = Keys(stack.env["BLAZE_REDIS_PREFIX"])
    shape = argparse.Namespace(
        device=args.device,
        max_wait_ms=50.0,
        concurrency_factor=1,
        size=args.size,
        steps=args.steps,
        timeout=900.0,
        jobs_per_batch=args.system_jobs,
    )
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for r in range(rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            stack.env["BLAZE_PROGRESS_INTERVAL_S"] = "0.5" if mode == "on" else "0"
            figures = run_system(
                stack,
                api_url=api_url,
                api_pid=api_pid,
                client=client,
                keys=keys,
                batch=args.system_batch,
                args=shape,
                threads=args.threads,
                factor=1,
                seed=random.randrange(2**30),
            )
            if figures["failed"]:
                raise StackError(f"system run failed: {figures.get('failure_sample')}")
            figures["worker_cpu_s_per_image"] = figures["cpu_s"]["worker"] / figures["images"]
            runs[mode].append(figures)
            print(
                f"  system round {r + 1} progress {mode:<3} {figures['images_per_s']:8.3f} images/s, "
                f"worker CPU {figures['worker_cpu_s_per_image']:.3f} s/image",
                flush=True,
            )
    client.close()
    ips = {m: statistics.median(f["images_per_s"] for f in runs[m]) for m in runs}
    cpu = {m: statistics.median(f["worker_cpu_s_per_image"] for f in runs[m]) for m in runs}
    return {
        "images_per_s_off": ips["off"],
        "images_per_s_on": ips["on"],
        "ratio_on_off": ips["on"] / ips["off"],
        "worker_cpu_s_per_image_off": cpu["off"],
        "worker_cpu_s_per_image_on": cpu["on"],
        "cpu_ratio_on_off": cpu["on"] / cpu["off"],
    }
