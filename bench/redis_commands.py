"""``python bench/redis_commands.py``: the Redis commands an echo job costs, from its create to
the client seeing it end, against a bare Celery no-op round trip on the same Redis, in one run.

Why: the commands per job bound how many jobs per second one Redis serves (a Redis runs one
command at a time on one core), whatever the number of workers.

The system: a private ``redis-server`` (so that no other program's commands are counted),
``blaze api`` and ``blaze worker --engine echo --concurrency 1`` under a private key prefix.
The client is ``BlazeClient``: ``submit`` an echo job (``sleep_ms`` 0), then ``wait`` for it
(long-poll ``GET /v1/jobs/{id}?wait=``), one job at a time, as a user would; then the same jobs
in one request each, ``submit(..., wait=60)`` (``POST /v1/jobs`` with ``Prefer: wait=60``).

Counting: ``CONFIG RESETSTAT`` then ``INFO commandstats`` after the work. Redis counts a
command run inside a script under its own name, and the ``EVALSHA`` that ran it too; both are
in the totals. First the system sits idle ``--idle-s`` seconds: what its processes cost per
second doing nothing (the worker's ``BRPOP``, lease renewals, heartbeats, the reaper) is
reported apart, and subtracted from the jobs' count for the time they took. The benchmark's
own ``INFO`` and ``CONFIG`` are left out.

The baseline: a throwaway Celery app (Redis broker and result backend, a prefix of its own, a
no-op task, a threads-pool worker with concurrency 1), one ``apply_async().get()`` at a time,
counted the same way once the Blaze processes have stopped.

Then, with ``--profile``, MONITOR over a few more jobs says which process sent each command
and in how many round trips (``bench/redis_trace.py``); MONITOR slows Redis, so it runs apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from blaze_jobs.client import BlazeClient
from blaze_jobs.errors import WaitTimeout
from blaze_jobs.stack import Stack, StackError, free_port, redis_reachable, redis_server_binary
from common import ADMIN_TOKEN, broke_off, forget_all, machine, start_api, unique_prefix, write_json
from overhead import bare_app, serve_bare
from redis_trace import print_trace, profile

#: The issue's goal: at most this many Redis commands per echo job, end to end.
GOAL = 30
#: The benchmark's own commands, not the system's.
OWN = {"info", "config|resetstat", "config", "ping"}
ECHO_INPUT = {"sleep_ms": 0}


def command_counts(client: redis.Redis) -> Counter:
    """Calls per command since the last ``CONFIG RESETSTAT`` (subcommands as ``client|setinfo``)."""
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return Counter({name: n for name, n in calls.items() if name not in OWN})


def measure(client: redis.Redis, work: Callable[[], Any]) -> tuple[Counter, float]:
    """The commands Redis ran while ``work`` ran, and how long it took."""
    client.config_resetstat()
    started = time.perf_counter()
    work()
    elapsed = time.perf_counter() - started
    return command_counts(client), elapsed


def repeat(work: Callable[[], None], times: int) -> None:
    for _ in range(times):
        work()


def per_unit(counts: Counter, *, units: int, idle: Counter, idle_s: float, elapsed: float) -> dict[str, float]:
    """Commands per unit of work, by command, less the idle rate over ``elapsed``; largest first."""
    net = {name: counts[name] - idle[name] / idle_s * elapsed for name in counts | idle}
    ordered = sorted(((n, v / units) for n, v in net.items() if round(v / units, 2) > 0), key=lambda item: -item[1])
    return {name: round(value, 2) for name, value in ordered}


def print_counts(title: str, counts: dict[str, float]) -> float:
    total = sum(counts.values())
    print(f"\n{title}: {total:.1f}")
    for name, value in counts.items():
        print(f"  {name:<22}{value:8.2f}")
    return total


def private_redis(stack: Stack) -> str:
    """A redis-server of this run's own: ``INFO commandstats`` is server-wide."""
    port = free_port()
    data_dir = stack.log_dir / "redis"
    data_dir.mkdir(exist_ok=True)
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    child = stack.start("redis", [*argv, "--dir", str(data_dir)])
    url = f"redis://127.0.0.1:{port}/0"
    stack.wait_for("redis", child, lambda: redis_reachable(url, timeout=0.2), timeout=15)
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="measured echo jobs (and bare round trips)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured jobs (and round trips) first")
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds each system sits idle to measure its polling")
    parser.add_argument("--profile", type=int, default=10, metavar="JOBS", help="jobs to trace with MONITOR (0: none)")
    parser.add_argument("--json", help="also write a JSON summary here")
    parser.add_argument("--serve-bare", nargs=2, metavar=("URL", "PREFIX"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        serve_bare(*args.serve_bare, events=False)
        return 0

    summary: dict[str, Any] = {"benchmark": "redis_commands", "machine_before": machine(), "goal": GOAL, "args": vars(args)}
    print(
        f"redis_commands: {args.jobs} sequential echo jobs vs bare Celery round trips, idle {args.idle_s:g} s each; "
        f"load average {summary['machine_before']['loadavg']}",
        flush=True,
    )
    prefix = unique_prefix("commands")
    bare_prefix = prefix[:-1] + "-bare:"
    here = str(Path(__file__).resolve())
    client: redis.Redis | None = None
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLAZE_")}
    try:
        with Stack(env=env) as stack:
            redis_url = private_redis(stack)
            client = redis.Redis.from_url(redis_url)
            stack.env.update(BLAZE_REDIS_URL=redis_url, BLAZE_REDIS_PREFIX=prefix)

            # 1. The system, warmed up: its first job ends once the worker consumes.
            api, api_url = start_api(stack)
            worker = stack.blaze("worker-echo", "worker", "--engine", "echo", "--concurrency", "1")
            blaze = BlazeClient(api_url, api_key=ADMIN_TOKEN, timeout=30)

            def one_job(timeout: float = 30) -> None:
                job = blaze.submit("echo", ECHO_INPUT)
                try:
                    ended = blaze.wait(job["id"], timeout=timeout)
                except WaitTimeout as error:
                    raise RuntimeError(f"{error}\nworker:\n{worker.log_tail()}\nAPI:\n{api.log_tail()}") from None
                if ended["status"] != "succeeded":
                    raise RuntimeError(f"echo job {job['id']} ended {ended['status']}: {ended.get('error')}\n{worker.log_tail()}")

            def one_preferring_job() -> None:
                job = blaze.submit("echo", ECHO_INPUT, wait=60)
                if job["status"] != "succeeded":
                    raise RuntimeError(f"echo job {job['id']} created with Prefer: wait answered {job['status']}")

            one_job(timeout=120)
            for _ in range(args.warmup):
                one_job()
                one_preferring_job()

            # 2. Idle, then the jobs: submit + wait, then one request each.
            idle, idle_s = measure(client, lambda: time.sleep(args.idle_s))
            jobs, jobs_s = measure(client, lambda: repeat(one_job, args.jobs))
            preferring, preferring_s = measure(client, lambda: repeat(one_preferring_job, args.jobs))
            blaze_trace = idle_trace = None
            if args.profile:
                pids = {"api": api.pid, "worker": worker.pid}
                blaze_trace = profile(redis_url, pids, count=args.profile, work=one_job, publisher="api", detail=True)
                idle_trace = profile(redis_url, pids, count=1, work=lambda: time.sleep(args.idle_s), publisher="api")
            blaze.close()
            for child in (worker, api):
                child.stop()

            # 3. The bare Celery round trip on the same Redis, counted the same way.
            bare_worker = stack.start("bare-worker", [sys.executable, here, "--serve-bare", redis_url, bare_prefix])
            task = bare_app(redis_url, bare_prefix).tasks["bench.noop"]

            def one_bare(timeout: float = 30) -> None:
                task.apply_async().get(timeout=timeout)

            try:
                one_bare(timeout=120)
            except Exception as error:
                raise StackError(f"the bare Celery worker did not answer ({error!r}):\n{bare_worker.log_tail()}") from None
            for _ in range(args.warmup):
                one_bare()
            bare_idle, bare_idle_s = measure(client, lambda: time.sleep(args.idle_s))
            bare, bare_s = measure(client, lambda: repeat(one_bare, args.jobs))
            bare_trace = None
            if args.profile:
                pids = {"client": os.getpid(), "bare worker": bare_worker.pid}
                bare_trace = profile(redis_url, pids, count=args.profile, work=one_bare, publisher="client", detail=True)
    except (StackError, RuntimeError) as error:
        return broke_off("bench/redis_commands.py", error, summary, args.json)
    finally:
        forget_all(client, prefix, bare_prefix)

    # 4. The counts.
    print(f"\nidle, the API and an echo worker (commands per second over {idle_s:.1f} s):")
    for name, calls in idle.most_common():
        print(f"  {name:<22}{calls / idle_s:8.2f}")
    print(f"  {'total':<22}{sum(idle.values()) / idle_s:8.2f}")
    job_counts = per_unit(jobs, units=args.jobs, idle=idle, idle_s=idle_s, elapsed=jobs_s)
    bare_counts = per_unit(bare, units=args.jobs, idle=bare_idle, idle_s=bare_idle_s, elapsed=bare_s)
    raw_total = sum(jobs.values()) / args.jobs
    total = print_counts(
        f"commands per echo job, submit + wait ({jobs_s / args.jobs * 1000:.1f} ms each; "
        f"{raw_total:.1f} before taking off idle polling), total",
        job_counts,
    )
    preferring_counts = per_unit(preferring, units=args.jobs, idle=idle, idle_s=idle_s, elapsed=preferring_s)
    preferring_total = print_counts(
        f"commands per echo job, one POST with Prefer: wait=60 ({preferring_s / args.jobs * 1000:.1f} ms each), total",
        preferring_counts,
    )
    bare_each_ms = bare_s / args.jobs * 1000
    bare_total = print_counts(f"commands per bare Celery apply_async + get ({bare_each_ms:.1f} ms each), total", bare_counts)
    print(f"\nidle, the bare Celery worker: {sum(bare_idle.values()) / bare_idle_s:.2f} commands per second")
    ratio = total / bare_total if bare_total else float("nan")
    verdict = "met" if total <= GOAL else "NOT met"
    print(f"\necho job / bare Celery round trip: {total:.1f} / {bare_total:.1f} = {ratio:.2f}×; goal ≤ {GOAL} per job: {verdict}")
    preferring_ratio = preferring_total / bare_total if bare_total else float("nan")
    print(f"with Prefer: wait, one request per job: {preferring_total:.1f} / {bare_total:.1f} = {preferring_ratio:.2f}×")
    summary.update(
        idle_per_s={n: round(c / idle_s, 3) for n, c in idle.items()},
        per_job=job_counts,
        per_job_total=round(total, 2),
        per_job_prefer_wait=preferring_counts,
        per_job_prefer_wait_total=round(preferring_total, 2),
        bare_per_round_trip=bare_counts,
        bare_total=round(bare_total, 2),
        ratio=round(ratio, 3),
    )
    if idle_trace:
        summary.setdefault("profile", {})["idle"] = idle_trace
        print(f"\nidle, by process (MONITOR over {args.idle_s:g} s), commands per second:")
        for process, commands in idle_trace["commands"].items():
            listed = ", ".join(f"{k} {v / args.idle_s:.2f}" for k, v in commands.items())
            print(f"  {process:<12} {listed}")
            inside = idle_trace["inside_scripts"].get(process)
            if inside:
                print(f"  {'':<12} inside its scripts: " + ", ".join(f"{k} {v / args.idle_s:.2f}" for k, v in inside.items()))
    for name, trace in (("blaze", blaze_trace), ("bare", bare_trace)):
        if trace:
            summary.setdefault("profile", {})[name] = trace
            print_trace(trace, what="echo job (submit + wait)" if name == "blaze" else "bare Celery round trip")
    summary["machine_after"] = machine()
    write_json(args.json, summary)
    return 0 if total <= GOAL else 2


if __name__ == "__main__":
    sys.exit(main())
