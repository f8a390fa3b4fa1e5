"""``python bench/batching.py``: diffusion throughput through the whole system against the
bare pipeline at the same batch size, in one run.

For each batch size B the raw baseline is ``StableDiffusionPipeline.__call__`` with B prompts
(same model, size, steps, guidance, dtype and device as the worker), timed in this process,
half of its calls before the system run and half after, so a drift in the machine shows.
The system is the real thing: ``blaze api`` and ``blaze worker --engine diffusion
--max-batch B --max-wait-ms 50`` as child processes under a private key prefix. After a
warm-up batch, ``--jobs-per-batch`` × B jobs, each with its own seed (so the cache never
answers), are posted over HTTP all at once; throughput is images over the span from the
first job's ``started_at`` to the last job's ``completed_at`` in the job records. The mean
batch is jobs / batches, read from each job's ``metrics.batch_size`` (a batch of s jobs
holds s records saying s); the mean of ``metrics.batch_size`` itself, which leans to the
larger batches, is printed beside it. The worker runs 2×B task threads, its default, so that
the next batch can form while one runs; ``--concurrency-factor 1 2`` also runs it with B.

``--sd15`` builds (once, into the model dir, with no download) a pipeline of the Stable
Diffusion 1.5 architecture with random weights, and the worker loads it by path
(``BLAZE_DIFFUSION_MODEL``): use it on a GPU at 512×512 (fp16). ``--sdxl`` does the same with
SDXL base 1.0's architecture (2.6 B UNet parameters, two text encoders): use it at 1024×1024.
Both sides run guidance 7.5 (the jobs name it: SDXL's own default is 5.0). Each row also
gives the worker's device busy fraction under the load, its batches' device time over the
span they ran in (goal on a GPU: at least 0.95). On a CPU the API, Redis,
Celery and the worker's task threads share the cores with the device work, and torch's
default of one thread per core degrades badly when something else wants a core: ``--threads
0 1`` repeats the run with the default and with one torch thread in both the baseline and
the worker. The CPU seconds the baseline and the worker spend per image are printed too:
on a shared machine they say more than the wall clock.

``--metrics-cost`` runs the system a second time for each row with the worker serving
``--metrics-port`` (recording every metric), the two runs in turn, and prints the ratio of
its images/s to the run without (goal at least 0.95).

Exit status: 0 when every job succeeded and every goal was met, 1 when a job failed or a
part did not start, 2 when a goal was missed.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path
from typing import Any

import redis

from blaze_jobs.settings import get_settings
from blaze_jobs.stack import Child, Stack, StackError, free_port
from blaze_jobs.store import Keys
from common import broke_off, forget_all, machine, start_api, unique_prefix, write_json
from pipelines import build_sd15, build_sdxl, engine_calls, load_pipeline, raw_calls  # keeps the Hugging Face hub offline
from system_run import run_system

#: The issue's goals: the system keeps this share of the raw pipeline's images/s …
GOAL_RATIO = 0.9
#: … and its batches are on average at least this share of ``--max-batch`` full.
GOAL_BATCH = 0.9
#: The system with the worker's metrics on keeps this share of its images/s with them off.
GOAL_METRICS = 0.95
#: On a GPU, the worker keeps its device busy this share of the time under saturating load
#: (its batches' device time over the span they ran in). On a CPU the "device" is the cores
#: the API, Redis and the worker's own threads share, so the figure is printed, not judged.
GOAL_BUSY = 0.95


class BenchStack(Stack):
    """The bench's stack: while ``metrics_on``, each worker it starts serves ``--metrics-port``."""

    metrics_on = False

    def blaze(self, name: str, *args: str, **env: str) -> Child:
        if self.metrics_on and args[:1] == ("worker",):
            args = (*args, "--metrics-port", str(free_port()))
        return super().blaze(name, *args, **env)


# --- one max batch size: the raw pipeline and the system ----------------------------------


def images_per_s(times: list[float], *, batch: int) -> float:
    """Images per second of calls of ``batch`` images that took ``times`` seconds each."""
    return batch * len(times) / sum(times)


def measure(
    pipe: Any,
    engine: Any,
    stack: BenchStack,
    *,
    api_url: str,
    api_pid: int,
    client: redis.Redis,
    keys: Keys,
    model: str,
    batch: int,
    threads: int,
    args: argparse.Namespace,
    seed: int,
) -> list[dict[str, Any]]:
    """Rows for max batch ``batch``, one per concurrency factor: the raw pipeline (half its
    calls before the system runs, half after) and the system."""
    calls = args.raw_calls or args.jobs_per_batch
    before, after = math.ceil(calls / 2), calls // 2
    shape = {"size": args.size, "steps": args.steps, "device": args.device}

    # 1. Raw: a warm-up call, then half the calls before the system runs …
    raw_calls(pipe, batch=batch, calls=1, seed=seed, **shape)
    times_before, cpu_before = raw_calls(pipe, batch=batch, calls=before, seed=seed, **shape)
    rate_before = images_per_s(times_before, batch=batch)
    print(f"  raw pipeline   {rate_before:8.3f} images/s ({before} calls)", flush=True)

    # 2. … the system, with each number of task threads (and with the worker's metrics on,
    #    before or after the run without, in turn) …
    systems: dict[int, dict[str, Any]] = {}
    with_metrics: dict[int, dict[str, Any]] = {}
    for turn, factor in enumerate(args.concurrency_factor, start=args.batch.index(batch)):
        modes = (False, True) if args.metrics_cost else (False,)
        for metrics_on in modes if turn % 2 == 0 else modes[::-1]:
            stack.metrics_on = metrics_on
            run = run_system(
                stack,
                api_url=api_url,
                api_pid=api_pid,
                client=client,
                keys=keys,
                batch=batch,
                args=args,
                threads=threads,
                factor=factor,
                seed=seed,
            )
            seed += batch * (args.jobs_per_batch + 2)
            (with_metrics if metrics_on else systems)[factor] = run
        stack.metrics_on = False
        system = systems[factor]
        images, worker_cpu = system.get("images") or 0, system["cpu_s"].get("worker")
        system["worker_cpu_s_per_image"] = worker_cpu / images if images and worker_cpu is not None else None
        systems[factor] = system
        print(
            f"  system {factor}×B    {system.get('images_per_s', math.nan):8.3f} images/s"
            f" over {system.get('span_s', math.nan):.2f} s, "
            f"mean batch {system.get('mean_batch', math.nan):.2f} (per job {system.get('mean_batch_per_job', math.nan):.2f}), "
            f"batches {system.get('batch_sizes')}, failed {system['failed']}, CPU s {system['cpu_s']}",
            flush=True,
        )
        if factor in with_metrics:
            on = with_metrics[factor]
            print(
                f"  metrics on     {on.get('images_per_s', math.nan):8.3f} images/s,"
                f" mean batch {on.get('mean_batch', math.nan):.2f}, failed {on['failed']}, CPU s {on['cpu_s']}",
                flush=True,
            )

    # 3. … and the other half after them, so a drift in the machine shows.
    times_after, cpu_after = raw_calls(pipe, batch=batch, calls=after, seed=seed + 1, **shape) if after else ([], 0.0)
    rate_after = images_per_s(times_after, batch=batch) if times_after else None
    if rate_after is not None:
        print(f"  raw pipeline   {rate_after:8.3f} images/s ({after} calls, after)", flush=True)
    times = times_before + times_after
    raw = {
        "images_per_s": images_per_s(times, batch=batch),
        "call_s": [round(t, 4) for t in times],
        "images_per_s_before": rate_before,
        "images_per_s_after": rate_after,
        "cpu_s_per_image": (cpu_before + cpu_after) / (batch * len(times)),
    }
    engine_row = None
    if engine is not None:
        engine_times = engine_calls(engine, model=model, batch=batch, calls=before, size=args.size, steps=args.steps, seed=seed)
        engine_row = {"images_per_s": images_per_s(engine_times, batch=batch)}
        print(f"  engine         {engine_row['images_per_s']:8.3f} images/s (DiffusionEngine.run_batch)", flush=True)

    rows = []
    raw_batch_s = sum(times) / len(times)
    for factor, system in systems.items():
        row: dict[str, Any] = {"batch": batch, "factor": factor, "raw": raw, "system": system, "engine": engine_row}
        row["ratio"] = system.get("images_per_s", 0.0) / raw["images_per_s"]
        metrics_run = with_metrics.get(factor)
        if metrics_run is not None:
            row["system_metrics_on"] = metrics_run
            off_rate = system.get("images_per_s")
            row["metrics_ratio"] = metrics_run.get("images_per_s", 0.0) / off_rate if off_rate else 0.0
            print(f"  {factor}×B: metrics on / off {row['metrics_ratio']:.3f} (goal >= {GOAL_METRICS})", flush=True)
        row["batch_fill"] = system.get("mean_batch", 0.0) / batch
        # CPU seconds per image, raw over the worker's: what the ratio is where cores are shared.
        worker_cpu = system["worker_cpu_s_per_image"]
        row["cpu_ratio"] = raw["cpu_s_per_image"] / worker_cpu if worker_cpu else None
        # What the span holds beyond the raw compute of its batches, per batch.
        batches = system.get("batches") or math.nan
        row["ms_lost_per_batch"] = (system.get("span_s", math.nan) - batches * raw_batch_s) / batches * 1000
        device_s = system.get("device_s_per_batch") or math.nan
        print(
            f"  {factor}×B: ratio {row['ratio']:.3f}   mean batch / B {row['batch_fill']:.3f}   "
            f"≈ {row['ms_lost_per_batch']:.1f} ms per batch beyond the raw call of {raw_batch_s * 1000:.0f} ms, "
            f"of which {(device_s - raw_batch_s) * 1000:.1f} ms in the worker's device call ({device_s * 1000:.0f} ms); "
            f"CPU s/image raw {raw['cpu_s_per_image']:.3f}, worker {worker_cpu or math.nan:.3f}; "
            f"device busy {system.get('device_busy') or math.nan:.3f}",
            flush=True,
        )
        rows.append(row)
    return rows


# --- reporting ----------------------------------------------------------------------------


def header(args: argparse.Namespace, model: str) -> str:
    return (
        f"batching: {model} {args.size}x{args.size}, {args.steps} steps, guidance 7.5, {args.device}, "
        f"max-wait {args.max_wait_ms:g} ms, {args.jobs_per_batch}×B jobs per run, "
        f"task threads {' or '.join(f'{f}×B' for f in args.concurrency_factor)}"
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'threads':>7} {'B':>3} {'tasks':>5} {'raw img/s':>10} {'system img/s':>13} {'ratio':>6} {'mean batch':>11} {'/B':>5}"
        f" {'ms lost/batch':>14} {'CPU s/img raw':>14} {'worker':>7} {'CPU ratio':>10} {'engine img/s':>13}"
        f" {'busy':>5} {'jobs':>5} {'failed':>6}"
    )
    for r in rows:
        s = r["system"]
        engine = f"{r['engine']['images_per_s']:>13.3f}" if r.get("engine") else f"{'-':>13}"
        print(
            f"{r['threads_label']:>7} {r['batch']:>3} {str(r['factor']) + '×B':>5} {r['raw']['images_per_s']:>10.3f}"
            f" {s.get('images_per_s', math.nan):>13.3f} {r['ratio']:>6.3f} {s.get('mean_batch', math.nan):>11.2f}"
            f" {r['batch_fill']:>5.2f} {r['ms_lost_per_batch']:>14.1f} {r['raw']['cpu_s_per_image']:>14.3f}"
            f" {s.get('worker_cpu_s_per_image') or math.nan:>7.3f}"
            f" {r['cpu_ratio'] or math.nan:>10.3f} {engine} {s.get('device_busy') or math.nan:>5.3f}"
            f" {s['jobs']:>5} {s['failed']:>6}"
        )


# --- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="max batch sizes to measure")
    parser.add_argument("--size", type=int, default=64, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 …")
    parser.add_argument("--jobs-per-batch", type=int, default=6, help="jobs posted per measured run, as a multiple of B")
    parser.add_argument("--raw-calls", type=int, default=None, help="bare pipeline calls per B (default: --jobs-per-batch)")
    parser.add_argument("--max-wait-ms", type=float, default=50.0, help="the worker's --max-wait-ms")
    parser.add_argument(
        "--concurrency-factor", type=int, nargs="+", default=[2], help="run factor×B task threads in the worker (2: its default)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0],
        help="torch threads in both the baseline and the worker; 0: the library default",
    )
    parser.add_argument("--engine-baseline", action="store_true", help="also time DiffusionEngine.run_batch in this process")
    parser.add_argument(
        "--metrics-cost", action="store_true", help="also run each system row with the worker's --metrics-port (metrics on)"
    )
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--sd15", action="store_true", help="a random-weight SD 1.5-shaped pipeline (for a GPU at 512)")
    shapes.add_argument("--sdxl", action="store_true", help="a random-weight SDXL-shaped pipeline (for a GPU at 1024)")
    parser.add_argument("--model-dir", type=Path, default=None, help="where models are built (default BLAZE_MODEL_DIR)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for one run's jobs (model load included)")
    parser.add_argument("--json", help="also write a JSON summary here")
    args = parser.parse_args(argv)
    if min(args.batch) < 1 or args.jobs_per_batch < 1 or args.size % 8 or args.steps < 1:
        parser.error("batches and jobs per batch must be at least 1, the size a multiple of 8")

    import torch

    settings = get_settings()
    model_dir = (args.model_dir or settings.model_dir).expanduser().resolve()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/batching.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 1
    if args.sd15 or args.sdxl:
        path = (build_sd15 if args.sd15 else build_sdxl)(model_dir, device=device)
        model = str(path)
    else:
        from blaze_jobs.builtin_models import builtin_path

        model = "builtin:tiny-sd"
        path = builtin_path(model, model_dir)
    default_threads = torch.get_num_threads()

    summary: dict[str, Any] = {
        "benchmark": "batching",
        "model": model,
        "size": args.size,
        "steps": args.steps,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "max_wait_ms": args.max_wait_ms,
        "jobs_per_batch": args.jobs_per_batch,
        "concurrency_factors": args.concurrency_factor,
        "default_torch_threads": default_threads,
        "machine_before": machine(),
        "goals": {
            "ratio": GOAL_RATIO,
            "batch_fill": GOAL_BATCH,
            "metrics_ratio": GOAL_METRICS if args.metrics_cost else None,
            "device_busy": GOAL_BUSY if device.startswith("cuda") else None,
        },
        "rows": [],
    }
    print(header(args, model), flush=True)
    print(
        f"device {summary['device_name']}; torch {torch.__version__}; default torch threads {default_threads}; "
        f"load average {summary['machine_before']['loadavg']}",
        flush=True,
    )

    pipe = load_pipeline(path, device=device)
    engine = None
    if args.engine_baseline:
        from blaze_jobs.engines.diffusion import DiffusionEngine

        engine = DiffusionEngine(model_dir=model_dir, device=device)
        engine.prepare(model)

    prefix = unique_prefix("batching")
    seed = random.randrange(1 << 30)
    rows: list[dict[str, Any]] = summary["rows"]
    client = None
    try:
        stack = BenchStack()
        with stack:
            redis_url = stack.redis(settings.redis_url)
            client = redis.Redis.from_url(redis_url)
            if redis_url != settings.redis_url:
                print(f"no Redis at {settings.redis_url}; started one at {redis_url}", flush=True)
            stack.env.update(
                BLAZE_REDIS_URL=redis_url,
                BLAZE_REDIS_PREFIX=prefix,
                BLAZE_MODEL_DIR=str(model_dir),
                BLAZE_DIFFUSION_MODEL=model,
                BLAZE_DEVICE=device,
                HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1",
            )
            api, api_url = start_api(stack)
            keys = Keys(prefix)
            for threads in args.threads:
                torch.set_num_threads(threads or default_threads)
                label = str(threads or f"{default_threads}*")
                for batch in args.batch:
                    print(f"\nB={batch}, torch threads {label}", flush=True)
                    measured = measure(
                        pipe,
                        engine,
                        stack,
                        api_url=api_url,
                        api_pid=api.pid,
                        client=client,
                        keys=keys,
                        model=model,
                        batch=batch,
                        threads=threads,
                        args=args,
                        seed=seed,
                    )
                    runs = len(args.concurrency_factor) * (2 if args.metrics_cost else 1)
                    seed += batch * (args.jobs_per_batch + 2) * (runs + 1)
                    for row in measured:
                        row["threads"], row["threads_label"] = threads or default_threads, label
                    rows.extend(measured)
    except (StackError, RuntimeError) as error:
        return broke_off("bench/batching.py", error, summary, args.json)
    finally:
        forget_all(client, prefix)

    summary["machine_after"] = machine()
    print("\n" + header(args, model))
    print_table(rows)
    print(
        "(threads: torch intra-op threads in the baseline and the worker, * the default here; tasks: the worker's task threads;"
        " mean batch: jobs / batches; ms lost/batch: span minus batches × the raw call, per batch;"
        " CPU s/img: the baseline's process, the worker's; CPU ratio: raw CPU s/img over the worker's;"
        " busy: the worker's device time over the span)"
    )
    busy = f", device busy >= {GOAL_BUSY}" if device.startswith("cuda") else ""
    loadavg = summary["machine_after"]["loadavg"]
    print(f"goals: ratio >= {GOAL_RATIO}, mean batch / B >= {GOAL_BATCH}{busy}; load average now {loadavg}")
    if args.metrics_cost:
        ratios = ", ".join(f"B={r['batch']} {r['factor']}×B {r['metrics_ratio']:.3f}" for r in rows)
        print(f"metrics on / off (images/s with the worker's --metrics-port over without): {ratios}; goal >= {GOAL_METRICS}")
    failed = sum(r["system"]["failed"] + r.get("system_metrics_on", {}).get("failed", 0) for r in rows)
    busy_goal = GOAL_BUSY if device.startswith("cuda") else 0.0
    met = all(
        r["ratio"] >= GOAL_RATIO
        and r["batch_fill"] >= GOAL_BATCH
        and r.get("metrics_ratio", GOAL_METRICS) >= GOAL_METRICS
        and (r["system"].get("device_busy") or 0.0) >= busy_goal
        for r in rows
    )
    summary["all_goals_met"] = met
    summary["failed_jobs"] = failed
    write_json(args.json, summary)
    if failed:
        return 1
    return 0 if met else 2


if __name__ == "__main__":
    sys.exit(main())
