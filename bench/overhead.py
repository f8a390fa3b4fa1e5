"""``python bench/overhead.py``: the end-to-end latency of an echo job against a bare Celery
round trip on the same Redis, in one run.

The system: ``blaze api`` and ``blaze worker --engine echo --concurrency 1`` under a private
key prefix. One job at a time, the client posts ``{"engine": "echo"}`` and reads the job until
it has ended, in one or more ``--modes``: ``wait`` blocks in ``GET /v1/jobs/{id}?wait=S``
(``auto`` picks it when the API's OpenAPI lists the parameter, else ``poll``), ``poll`` reads
``GET /v1/jobs/{id}`` every ``--poll-ms``, ``prefer`` asks the create itself to answer once
the job has ended (``Prefer: wait=S``). Latency is from sending the POST to reading the
terminal state. The client is ``http.client`` on one keep-alive connection, so it adds
little of its own.

The baseline: a throwaway Celery app with a Redis broker and result backend (the same Redis,
a prefix of its own) and a no-op task, served by its own worker process with the threads
pool and concurrency 1; one ``apply_async(...).get()`` at a time. A second such worker runs
with task events on (``-E``), as a Blaze worker does for Flower, to show what they cost.

Everything is measured in alternating blocks after a warm-up, so a change in the machine's
load touches all alike. It prints p50/p90/p99 of each, the ratio of the p50s (goal at most
``GOAL``) overall and per block; then where a job's time goes (from the job record's
timestamps), the API's floor (HTTP alone), the CPU each process spent per job, and, with
``--profile``, every Redis command each process sent for one job or round trip (MONITOR).

Exit status: 0 when every job succeeded and the goal was met, 1 when a job failed or a part
did not start, 2 when the goal was missed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from blaze_jobs.settings import get_settings
from blaze_jobs.stack import Stack, StackError
from common import (
    AUTH,
    HOST,
    broke_off,
    cpu_seconds,
    forget_all,
    latency_summary,
    machine,
    start_api,
    unique_prefix,
    write_json,
)
from redis_trace import print_trace, profile

#: The issue's goal: an echo job's p50 is at most this many times the bare round trip's.
GOAL = 1.5
ENDED = {"succeeded", "failed", "canceled"}
ECHO = json.dumps({"engine": "echo", "input": {}}).encode()


# --- the baseline: a bare Celery app --------------------------------------------------------


def bare_app(redis_url: str, prefix: str) -> Any:
    """Celery with Redis as broker and result backend, its keys under ``prefix``, one no-op task."""
    from celery import Celery

    app = Celery("blaze-bench-bare", broker=redis_url, backend=redis_url)
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        task_default_queue="noop",
        broker_connection_retry_on_startup=True,
        result_expires=600,
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.noop", shared=False)
    def noop() -> None:
        return None

    return app


def serve_bare(redis_url: str, prefix: str, *, events: bool) -> None:
    app = bare_app(redis_url, prefix)
    argv = ["worker", "--pool=threads", "--concurrency=1", "--without-mingle", "--without-gossip"]
    if events:
        argv.append("--task-events")  # as a Blaze worker runs (Flower's task events)
    app.worker_main([*argv, "--loglevel=WARNING", f"--hostname=bench-bare-{os.getpid()}@%h"])


# --- the system's client ----------------------------------------------------------------------


class Http:
    """One keep-alive HTTP/1.1 connection, as cheap per request as the standard library gets."""

    #: uvicorn closes a keep-alive connection idle for 5 s; open a new one well before that.
    IDLE_S = 2.0

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = self._connect()
        self.used = time.monotonic()

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
        headers = {**({"Content-Type": "application/json"} if body is not None else {}), **AUTH, **(headers or {})}
        if time.monotonic() - self.used > self.IDLE_S:
            self.conn.close()
            self.conn = self._connect()
        self.used = time.monotonic()
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {response.status} {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


def long_poll_param(port: int) -> str | None:
    """The name of ``GET /v1/jobs/{id}``'s blocking-wait query parameter, if the API has one."""
    client = Http(port)
    try:
        spec = client.call("GET", "/openapi.json")
    finally:
        client.close()
    for path, operations in spec.get("paths", {}).items():
        if path.startswith("/v1/jobs/{") and path.count("/") == 3:
            for parameter in operations.get("get", {}).get("parameters", []):
                if parameter.get("in") == "query" and parameter.get("name") == "wait":
                    return "wait"
    return None


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def blaze_job(client: Http, *, mode: str, wait_s: float, poll_s: float, timeout: float = 30.0) -> dict[str, Any]:
    """One echo job from POST to its terminal state; its latency and where the time went.

    ``mode``: ``poll`` reads ``GET /v1/jobs/{id}`` every ``poll_s``; ``wait`` blocks in
    ``GET /v1/jobs/{id}?wait=S``; ``prefer`` asks the create itself to answer once the job
    has ended (``Prefer: wait=S``), and long-polls only if it did not.
    """
    sent_wall, sent = time.time(), time.perf_counter()
    deadline = sent + timeout
    headers = {"Prefer": f"wait={wait_s:g}"} if mode == "prefer" else None
    job = client.call("POST", "/v1/jobs", ECHO, headers)
    posted = time.perf_counter()
    path = f"/v1/jobs/{job['id']}" + (f"?wait={wait_s:g}" if mode != "poll" else "")
    reads = 0
    while job["status"] not in ENDED:
        if poll_s and mode == "poll":
            time.sleep(poll_s)
        job = client.call("GET", path)
        reads += 1
        if time.perf_counter() > deadline:
            raise RuntimeError(f"echo job {job['id']} still {job['status']} after {timeout:g} s")
    done, seen_wall = time.perf_counter(), time.time()
    created = datetime.fromisoformat(job["created_at"]).timestamp()  # a stored job always has one
    started, completed = _ts(job["started_at"]), _ts(job["completed_at"])
    return {
        "id": job["id"],
        "status": job["status"],
        "latency": done - sent,
        "post": posted - sent,
        "reads": reads,
        # From the job record's timestamps (one clock: every process runs on this machine).
        "api": created - sent_wall,
        "queue": (started - created) if started else None,
        "run": (completed - started) if started and completed else None,
        "seen": (seen_wall - completed) if completed else None,
    }


# --- the run -------------------------------------------------------------------------------------


def median_ms(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.median(present) * 1000 if present else float("nan")


def print_summary(name: str, summary: dict[str, float], ratio: float | None = None) -> None:
    print(
        f"{name:<44}{summary['p50_ms']:>9.3f}{summary['p90_ms']:>9.3f}{summary['p99_ms']:>9.3f}"
        f"{summary['mean_ms']:>9.3f}{summary['n']:>6}" + (f"{ratio:>11.2f}" if ratio is not None else "")
    )


def describe(mode: str, args: argparse.Namespace) -> str:
    return {
        "poll": f"GET every {args.poll_ms:g} ms",
        "wait": f"GET ?wait={args.wait_s:g}",
        "prefer": f"POST Prefer: wait={args.wait_s:g}",
    }[mode]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300, help="measured jobs per mode (and bare round trips)")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured jobs (and round trips) first")
    parser.add_argument("--block", type=int, default=25, help="alternate bare and blaze every this many")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("auto", "poll", "wait", "prefer"),
        default=["auto"],
        help="how the client learns the end: poll, wait (GET ?wait=), prefer (POST with Prefer: wait=); "
        "auto: wait when the API has it, else poll. The first is the one the goal is judged on.",
    )
    parser.add_argument("--poll-ms", type=float, default=1.0, help="pause between polls")
    parser.add_argument("--wait-s", type=float, default=10.0, help="the long-poll's wait, in seconds")
    parser.add_argument(
        "--profile", type=int, default=20, metavar="JOBS", help="jobs to trace with MONITOR after measuring (0: none)"
    )
    parser.add_argument("--json", help="also write a JSON summary here")
    parser.add_argument("--no-events-baseline", action="store_true", help="skip the bare Celery run with task events on")
    parser.add_argument("--serve-bare", metavar="PREFIX", help=argparse.SUPPRESS)
    parser.add_argument("--events", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.serve_bare:
        serve_bare(settings.redis_url, args.serve_bare, events=args.events)
        return 0

    summary: dict[str, Any] = {"benchmark": "overhead", "machine_before": machine(), "goal": GOAL, "args": vars(args)}
    print(
        f"overhead: {args.jobs} sequential echo jobs per mode vs bare Celery round trips, after {args.warmup} of each; "
        f"load average {summary['machine_before']['loadavg']}",
        flush=True,
    )
    prefix = unique_prefix("overhead")
    bare_prefixes = {"bare": prefix[:-1] + "-bare:", "bare+events": prefix[:-1] + "-bare-events:"}
    if args.no_events_baseline:
        del bare_prefixes["bare+events"]
    client = None
    here = str(Path(__file__).resolve())
    try:
        with Stack() as stack:
            redis_url = stack.redis(settings.redis_url)
            client = redis.Redis.from_url(redis_url)
            stack.env.update(BLAZE_REDIS_URL=redis_url, BLAZE_REDIS_PREFIX=prefix)
            api, api_url = start_api(stack)
            worker = stack.blaze("worker-echo", "worker", "--engine", "echo", "--concurrency", "1")
            bare_workers = {
                name: stack.start(
                    name, [sys.executable, here, "--serve-bare", bare_prefix, *(["--events"] if "events" in name else [])]
                )
                for name, bare_prefix in bare_prefixes.items()
            }
            port = int(api_url.rsplit(":", 1)[1])
            has_wait = long_poll_param(port) is not None
            modes = list(dict.fromkeys(("wait" if has_wait else "poll") if m == "auto" else m for m in args.modes))
            if not has_wait and set(modes) & {"wait", "prefer"}:
                raise StackError("GET /v1/jobs/{id} has no ?wait parameter: only --modes poll works against this API")
            print("the client learns the end by " + "; ".join(describe(m, args) for m in modes), flush=True)

            http = Http(port)
            tasks = {name: bare_app(redis_url, bare_prefix).tasks["bench.noop"] for name, bare_prefix in bare_prefixes.items()}

            def one_blaze(mode: str, timeout: float = 30.0) -> dict[str, Any]:
                return blaze_job(http, mode=mode, wait_s=args.wait_s, poll_s=args.poll_ms / 1000, timeout=timeout)

            def one_bare(name: str, timeout: float = 30.0) -> float:
                started = time.perf_counter()
                tasks[name].apply_async().get(timeout=timeout)
                return time.perf_counter() - started

            # 1. Everything ready: the first of each ends once its worker has started and consumes.
            if one_blaze(modes[0], timeout=120)["status"] != "succeeded":
                raise StackError(f"the first echo job did not succeed:\n{worker.log_tail()}")
            for name, bare_worker in bare_workers.items():
                try:
                    one_bare(name, timeout=120)
                except Exception as error:
                    raise StackError(f"the {name} Celery worker did not answer ({error!r}):\n{bare_worker.log_tail()}") from None
            runs = [*bare_prefixes, *modes]
            for _ in range(args.warmup):
                for name in runs:
                    one_bare(name) if name in bare_prefixes else one_blaze(name)

            # 2. Alternating blocks; the CPU each process spends is counted over its own blocks.
            pids = {"api": api.pid, "worker": worker.pid, "client": os.getpid(), **{n: w.pid for n, w in bare_workers.items()}}
            latencies: dict[str, list[Any]] = {name: [] for name in runs}
            cpu: dict[str, Counter] = {name: Counter() for name in runs}
            done = 0
            while done < args.jobs:
                size = min(args.block, args.jobs - done)
                # Alternate the order, so that neither always runs right after the other.
                for name in runs if (done // args.block) % 2 == 0 else runs[::-1]:
                    before = {n: cpu_seconds(p) or 0.0 for n, p in pids.items()}
                    if name in bare_prefixes:
                        latencies[name] += [one_bare(name) for _ in range(size)]
                    else:
                        latencies[name] += [one_blaze(name) for _ in range(size)]
                    after = {n: cpu_seconds(p) or 0.0 for n, p in pids.items()}
                    cpu[name].update({n: after[n] - before[n] for n in pids})
                done += size

            # 3. The API's floor: HTTP alone, and reading an ended job without waiting.
            ended = one_blaze(modes[0])
            floor = {}
            for label, path in (("GET /healthz", "/healthz"), ("GET /v1/jobs/{id} (ended)", f"/v1/jobs/{ended['id']}")):
                times = []
                for _ in range(max(50, args.jobs // 3)):
                    started = time.perf_counter()
                    http.call("GET", path)
                    times.append(time.perf_counter() - started)
                floor[label] = latency_summary(times)

            # 4. Every Redis command of a few more of each (MONITOR slows Redis: not measured).
            traced = {}
            if args.profile:
                blaze_pids = {"api": api.pid, "worker": worker.pid}
                traced["blaze"] = profile(
                    redis_url, blaze_pids, count=args.profile, work=lambda: one_blaze(modes[0]), publisher="api"
                )
                bare_pids = {"client": os.getpid(), "bare worker": bare_workers["bare"].pid}
                traced["bare"] = profile(
                    redis_url, bare_pids, count=args.profile, work=lambda: one_bare("bare"), publisher="client"
                )
            http.close()
    except (StackError, RuntimeError) as error:
        return broke_off("bench/overhead.py", error, summary, args.json)
    finally:
        forget_all(client, prefix, *bare_prefixes.values())

    # 5. Latencies and ratios.
    bare_s = latency_summary(latencies["bare"])
    summary["bare"] = bare_s
    summary["modes"] = {}
    print(f"\n{'sequential round trip':<44}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'n':>6}{'p50 ratio':>11}")
    print_summary("bare Celery apply_async + get", bare_s, 1.0)
    if "bare+events" in latencies:
        events_s = latency_summary(latencies["bare+events"])
        summary["bare_with_events"] = events_s
        print_summary("  the same, worker task events on (-E)", events_s, events_s["p50_ms"] / bare_s["p50_ms"])
    failed = 0
    for mode in modes:
        jobs = latencies[mode]
        stats = latency_summary([j["latency"] for j in jobs])
        ratio = stats["p50_ms"] / bare_s["p50_ms"]
        failed += sum(j["status"] != "succeeded" for j in jobs)
        summary["modes"][mode] = {
            "how": describe(mode, args),
            "latency": stats,
            "ratio_p50": ratio,
            "median_parts_ms": {name: median_ms([j[name] for j in jobs]) for name in ("post", "api", "queue", "run", "seen")},
            "median_reads": statistics.median(j["reads"] for j in jobs),
            "cpu_us_per_job": {n: round(cpu[mode][n] / args.jobs * 1e6) for n in ("api", "worker", "client")},
        }
        # Each block of jobs against the bare block run just before it: a drift in the
        # machine's load between blocks then cancels out.
        block_ratios = [
            statistics.median(j["latency"] for j in jobs[i : i + args.block])
            / statistics.median(latencies["bare"][i : i + args.block])
            for i in range(0, len(jobs), args.block)
        ]
        summary["modes"][mode]["block_ratios"] = [round(r, 3) for r in block_ratios]
        summary["modes"][mode]["median_block_ratio"] = statistics.median(block_ratios)
        print_summary(f"blaze echo job ({describe(mode, args)})", stats, ratio)
    primary = summary["modes"][modes[0]]
    summary["ratio_p50"] = primary["ratio_p50"]
    summary["failed"] = failed
    verdict = "met" if primary["ratio_p50"] <= GOAL else "NOT met"
    for mode in modes:
        ratios = summary["modes"][mode]["block_ratios"]
        print(
            f"per block of {args.block}, p50 {mode} / p50 bare: {', '.join(f'{r:.2f}' for r in ratios)}; "
            f"median {summary['modes'][mode]['median_block_ratio']:.2f}"
        )
    print(f"goal: p50 of blaze ({describe(modes[0], args)}) <= {GOAL} × bare: {verdict}")

    # 6. Where the time goes.
    print("\nwhere an echo job's time goes (medians, ms; from the job record's timestamps):")
    print(f"  {'':<50}" + "".join(f"{m:>10}" for m in modes))
    rows = (
        ("POST round trip, as the client sees it", "post"),
        ("POST sent -> created_at (HTTP, validation)", "api"),
        ("created_at -> started_at (publish, Celery, take)", "queue"),
        ("started_at -> completed_at (run, record the end)", "run"),
        ("completed_at -> the client has it", "seen"),
    )
    for label, key in rows:
        print(f"  {label:<50}" + "".join(f"{summary['modes'][m]['median_parts_ms'][key]:>10.3f}" for m in modes))
    print(f"  {'reads after the POST':<50}" + "".join(f"{summary['modes'][m]['median_reads']:>10g}" for m in modes))
    summary["api_floor"] = floor
    print("the API alone, one request at a time: " + ", ".join(f"{k} p50 {v['p50_ms']:.3f} ms" for k, v in floor.items()))
    print("\nCPU per job or round trip (µs, summed over the blocks of each):")
    summary["bare_cpu_us"] = {}
    for name in bare_prefixes:
        used = {"worker": round(cpu[name][name] / args.jobs * 1e6), "client": round(cpu[name]["client"] / args.jobs * 1e6)}
        summary["bare_cpu_us"][name] = used
        print(f"  {name:<17}: worker {used['worker']}, client {used['client']}")
    for mode in modes:
        c = summary["modes"][mode]["cpu_us_per_job"]
        print(f"  blaze {mode:<6}     : API {c['api']}, worker {c['worker']}, client {c['client']}")

    for name, trace in traced.items():
        summary.setdefault("profile", {})[name] = trace
        print_trace(trace, what=f"echo job ({describe(modes[0], args)})" if name == "blaze" else "bare Celery round trip")
    summary["machine_after"] = machine()
    print(f"\nload average now {summary['machine_after']['loadavg']}")
    write_json(args.json, summary)
    if failed:
        return 1
    return 0 if primary["ratio_p50"] <= GOAL else 2


if __name__ == "__main__":
    sys.exit(main())
