"""``python bench/submit.py``: the API's submit path against a bare endpoint, and with
authentication and rate limiting on against off, in one run.

Submitting is the API's hot path. The baseline is the least any submit endpoint can do:
a FastAPI app in its own uvicorn process (one worker, uvloop + httptools, as ``blaze api``
serves) that validates a small pydantic body, sends one pipelined HSET + LPUSH with
redis.asyncio and answers 202. The real API (``blaze api``) takes ``POST /v1/jobs`` with the
same echo body under the same load, twice over: once with ``BLAZE_AUTH=off``, and once with
auth on, every request carrying a stored API key (``blaze keys create``) whose rate limit
(moving window on Redis) and job quota are counted but set too high ever to refuse. The
load generator runs in its own process, so on two cores the server has one and the
generator the other. It prints the rates, p50/p99 and two ratios: the API (auth off) over
the bare endpoint, goal at least ``GOAL``, and auth on over auth off, goal at least
``AUTH_GOAL`` (a key check costs microseconds from the API's key cache, not a round trip).

The cost of metrics: a fifth server, the API with auth off and ``BLAZE_METRICS=off``, takes
the same load, and the API with auth off (metrics on, as by default: every request counted
and timed, every create counted, in prometheus-client's multiprocess mode) over it is
printed, goal at least ``METRICS_GOAL``.

With ``--batch N``, each run also sends one batch of N echo requests to the API with a
stored key (quota, no rate limit), as the unmodified ``openai`` client does (upload the JSONL
file, ``batches.create``, which answers once every job is stored and queued), and prints the
jobs created per second that way over that API's single-create rate of the same run, goal
at least ``BATCH_GOAL``.

Nothing consumes the queues: every key a server wrote is deleted at the end (and between
runs, so each run starts from the same Redis; the stored key is made again). Exit status: 0
when every response was 2xx and the ratios met ``--min-ratio``, ``--min-auth-ratio``,
``--min-metrics-ratio`` (and,
with ``--batch``, ``--min-batch-ratio``), 1 when any request failed, 2 when a ratio fell short.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel

from blaze_jobs.api_keys import create_key
from blaze_jobs.settings import Settings, get_settings
from blaze_jobs.stack import Stack, StackError, free_port

HOST = "127.0.0.1"
LOADGEN = Path(__file__).resolve().with_name("loadgen.py")
#: The body both servers get: an echo job, the cheapest engine, so only the API is measured.
JOB = {"engine": "echo", "input": {"prompt": "a lighthouse at dusk"}}
#: The issue's target: the real submit path keeps at least this share of the bare rate.
GOAL = 0.8
#: With a key checked and rate limited on every request, at least this share of auth off.
AUTH_GOAL = 0.9
#: With metrics recorded (the default), at least this share of the rate with them off.
METRICS_GOAL = 0.95
#: The bench key's limits: counted on every request, but far above what a run reaches, so
#: none is refused (a few thousand creates a second for seconds; nothing consumes them).
BENCH_RATE = "100000000/minute"
BENCH_MAX_JOBS = 100_000_000
#: The API's queue bound in both runs: checked on every create, never reached.
BENCH_QUEUE_MAX = 100_000_000
#: The issue's target: a batch file's jobs are created at least this many times faster than
#: one create request each.
BATCH_GOAL = 10.0


# --- the baseline server ------------------------------------------------------------------


class Prompt(BaseModel):
    prompt: str


class Submit(BaseModel):
    """The bare endpoint's body: ``{"engine": ..., "input": {"prompt": ...}}``."""

    engine: str
    input: Prompt


def baseline_app(*, redis_url: str, prefix: str, gc_freeze: bool = False) -> Any:
    """Validate, HSET + LPUSH in one pipelined round trip, answer 202: nothing more
    (with ``gc_freeze``, also freeze the start-up heap out of the garbage collector, as
    ``blaze api`` does)."""
    import gc

    import redis.asyncio
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = redis.asyncio.Redis.from_url(redis_url)
        if gc_freeze:
            gc.collect()
            gc.freeze()
        yield
        await app.state.redis.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/jobs", status_code=202)
    async def create(body: Submit) -> JSONResponse:
        job_id = str(uuid.uuid4())
        prompt = body.input.prompt
        async with app.state.redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                f"{prefix}job:{job_id}", mapping={"id": job_id, "engine": body.engine, "status": "queued", "prompt": prompt}
            )
            pipe.lpush(f"{prefix}{body.engine}", json.dumps({"id": job_id, "engine": body.engine, "prompt": prompt}))
            await pipe.execute()
        return JSONResponse({"id": job_id, "status": "queued"}, status_code=202)

    return app


def serve_baseline(*, port: int, redis_url: str, prefix: str, gc_freeze: bool) -> None:
    import uvicorn

    app = baseline_app(redis_url=redis_url, prefix=prefix, gc_freeze=gc_freeze)
    uvicorn.run(app, host=HOST, port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


# --- measuring ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux), to report CPU per request."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def load(
    *, port: int, pid: int, seconds: float, warmup: float, connections: int, headers: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run the load generator in its own process against ``POST /v1/jobs`` on ``port``."""
    argv = [sys.executable, str(LOADGEN), "--port", str(port), "--path", "/v1/jobs", "--body", json.dumps(JOB)]
    argv += ["--connections", str(connections), "--seconds", str(seconds), "--warmup", str(warmup)]
    for header in headers:
        argv += ["--header", header]
    before = cpu_seconds(pid)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=warmup + seconds + 60)
    after = cpu_seconds(pid)
    try:
        result = json.loads(done.stdout)
    except ValueError:
        raise RuntimeError(f"the load generator failed (exit {done.returncode}):\n{done.stderr[-2000:]}") from None
    if before is not None and after is not None and result["responses_total"]:
        # Over warm-up and window together: the server's CPU for each response it gave.
        result["cpu_us_per_req"] = (after - before) / result["responses_total"] * 1e6
    return result


def bench_key(client: redis.Redis, redis_url: str, prefix: str, *, rate: str | None) -> str:
    """A stored key of tenant ``bench`` under ``prefix``, as ``blaze keys create`` makes one,
    with limits that are checked but never reached (``rate`` None: not rate limited, the
    benchmark's APIs having no default rate)."""
    settings = Settings(redis_url=redis_url, redis_prefix=prefix)
    secret, _ = create_key(client, settings, tenant="bench", name="bench", rate=rate, max_jobs=BENCH_MAX_JOBS)
    return secret


def forget(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted


def batch_run(*, port: int, key: str, requests: int, client: redis.Redis, queue: str) -> dict[str, Any]:
    """Send one batch of ``requests`` echo jobs through the ``openai`` client (upload, then
    ``batches.create``) and time it until the create answers, every job stored and queued."""
    import openai

    body = {"engine": "echo", "input": {"prompt": "a lighthouse at dusk"}}
    lines = b"".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/jobs", "body": body}).encode() + b"\n"
        for i in range(requests)
    )
    # What the last forget unlinked is freed by a thread of Redis's: let it finish first.
    deadline = time.monotonic() + 10
    while int(client.info("memory").get("lazyfree_pending_objects", 0)) and time.monotonic() < deadline:
        time.sleep(0.05)
    queued_before = client.llen(queue)
    with openai.OpenAI(api_key=key, base_url=f"http://{HOST}:{port}/v1", timeout=300, max_retries=0) as api:
        # The client's first request also works out its platform headers and connects: not the API's time.
        api.files.list(limit=1)
        started = time.perf_counter()
        uploaded = api.files.create(file=("bench.jsonl", lines), purpose="batch")
        uploaded_at = time.perf_counter()
        batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/jobs", completion_window="24h")  # type: ignore[arg-type]
        took = time.perf_counter() - started
    queued = client.llen(queue) - queued_before
    counts = batch.request_counts
    ok = batch.status == "in_progress" and counts is not None and counts.total == requests and queued == requests
    return {
        "ok": ok,
        "status": batch.status,
        "queued": queued,
        "seconds": took,
        "upload_s": uploaded_at - started,
        "rate": requests / took,
        "bytes": len(lines),
    }


# --- reporting ----------------------------------------------------------------------------


def median_of(results: list[dict[str, Any]], name: str) -> float:
    values = [r[name] for r in results if r.get(name) is not None]
    return statistics.median(values) if values else float("nan")


def row(label: str, results: list[dict[str, Any]]) -> str:
    failed = sum(r["non_2xx"] + r["errors"] for r in results)
    return (
        f"{label:<44}{median_of(results, 'rate'):>10,.0f}{median_of(results, 'p50_ms'):>9.2f}"
        f"{median_of(results, 'p99_ms'):>9.2f}{median_of(results, 'cpu_us_per_req'):>12.0f}"
        f"{median_of(results, 'client_cpu_us_per_req'):>12.0f}{failed:>8}"
    )


def ratio_line(label: str, over: list[dict[str, Any]], under: list[dict[str, Any]], *, goal: float) -> float:
    """Print the ratio of the median rates (and each run's); returns it."""
    ratios = [b["rate"] / a["rate"] if a["rate"] else 0.0 for a, b in zip(under, over, strict=True)]
    ratio = median_of(over, "rate") / median_of(under, "rate") if median_of(under, "rate") else 0.0
    verdict = "met" if ratio >= goal else "NOT met"
    per_run = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"{label:<44}{ratio:>10.2f}   goal >= {goal}: {verdict}" + (f"   (runs: {per_run})" if len(ratios) > 1 else ""))
    return ratio


def report(results: dict[str, list[dict[str, Any]]], *, args: argparse.Namespace) -> tuple[float, float, float]:
    """Print the table and the ratios: (blaze auth off / bare, auth on / auth off, metrics on / off)."""
    base, off, on, key_only = results["bare"], results["auth-off"], results["auth-on"], results["key-only"]
    unwatched = results["metrics-off"]
    runs = f", median of {len(base)} runs" if len(base) > 1 else ""
    print(f"\nsubmit: {args.connections} connections, {args.seconds:g} s measured after {args.warmup:g} s warm-up{runs}")
    print(f"{'endpoint':<44}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'server µs/req':>14}{'loadgen µs':>12}{'failed':>8}")
    print(row("bare validate + HSET + LPUSH" + (" (gc.freeze)" if args.bare_gc_freeze else ""), base))
    print(row("POST /v1/jobs (blaze api, BLAZE_AUTH=off)", off))
    print(row("POST /v1/jobs (API key, rate limit, quota)", on))
    print(row("POST /v1/jobs (API key, quota, no rate limit)", key_only))
    print(row("POST /v1/jobs (auth off, BLAZE_METRICS=off)", unwatched))
    ratio = ratio_line("ratio blaze (auth off) / bare", off, base, goal=GOAL)
    auth_ratio = ratio_line("ratio auth on / auth off", on, off, goal=AUTH_GOAL)
    # Where the cost of auth on lies: the key and the quota, or the rate limit's count.
    ratio_line("ratio key without rate limit / auth off", key_only, off, goal=AUTH_GOAL)
    metrics_ratio = ratio_line("ratio metrics on / off (auth off)", off, unwatched, goal=METRICS_GOAL)
    for name, each in results.items():
        if name == "batch":
            continue
        for result in each:
            if not result["ok"]:
                print(
                    f"{name}: FAILED statuses={result['statuses']} errors={result['errors']}"
                    f" {result['error_samples']} {result['failure_sample']}"
                )
    return ratio, auth_ratio, metrics_ratio


# --- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per endpoint and run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load before each window")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1, help="alternate the endpoints this many times; report medians")
    parser.add_argument("--min-ratio", type=float, default=GOAL, help="exit 2 when blaze (auth off) / bare is below this")
    parser.add_argument("--min-auth-ratio", type=float, default=AUTH_GOAL, help="exit 2 when auth on / auth off is below this")
    parser.add_argument(
        "--min-metrics-ratio", type=float, default=METRICS_GOAL, help="exit 2 when metrics on / off is below this"
    )
    parser.add_argument(
        "--bare-gc-freeze", action="store_true", help="give the bare endpoint blaze api's gc.freeze() after start-up too"
    )
    parser.add_argument("--batch", type=int, default=0, metavar="N", help="also time one batch of N echo requests per run")
    parser.add_argument(
        "--min-batch-ratio", type=float, default=BATCH_GOAL, help="exit 2 when batch jobs/s over single creates/s is below this"
    )
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    redis_url = get_settings().redis_url
    if args.serve_baseline:
        serve_baseline(port=args.serve_baseline, redis_url=redis_url, prefix=args.prefix, gc_freeze=args.bare_gc_freeze)
        return 0
    if not 1 <= args.runs <= 20:
        parser.error("--runs must lie within [1, 20]")

    tag = f"blaze-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    prefixes = {
        "bare": f"{tag}-bare:",
        "auth-off": f"{tag}-off:",
        "auth-on": f"{tag}-on:",
        "key-only": f"{tag}-key:",
        "metrics-off": f"{tag}-nometrics:",
    }
    client = redis.Redis.from_url(redis_url)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in prefixes}
    batch_results: list[dict[str, Any]] = []
    try:
        with Stack() as stack:
            # No default rate: only the key made with BENCH_RATE is rate limited.
            stack.env.update(BLAZE_REDIS_URL=redis_url, BLAZE_QUEUE_MAX=str(BENCH_QUEUE_MAX), BLAZE_DEFAULT_RATE="")
            ports = {name: free_port() for name in prefixes}
            bare_argv = [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", str(ports["bare"])]
            bare_argv += ["--prefix", prefixes["bare"]] + (["--bare-gc-freeze"] if args.bare_gc_freeze else [])
            servers = {"bare": stack.start("bare", bare_argv)}
            apis = (("auth-off", "off", "on"), ("auth-on", "on", "on"), ("key-only", "on", "on"), ("metrics-off", "off", "off"))
            for name, auth, watched in apis:
                servers[name] = stack.blaze(
                    name,
                    "api",
                    "--port",
                    str(ports[name]),
                    BLAZE_REDIS_PREFIX=prefixes[name],
                    BLAZE_AUTH=auth,
                    BLAZE_ADMIN_TOKEN="",
                    BLAZE_METRICS=watched,
                )
            stack.wait_http("the bare server", servers["bare"], f"http://{HOST}:{ports['bare']}/healthz", timeout=60)
            for name, _, _ in apis:
                stack.wait_http(f"the API ({name})", servers[name], f"http://{HOST}:{ports[name]}/readyz", timeout=60)
            for run in range(args.runs):
                # Alternate the order, so a drift in the machine favours none of them.
                order = list(prefixes) if run % 2 == 0 else list(reversed(prefixes))
                for name in order:
                    # Made again each run: the forget after the last one took it along.
                    rate = BENCH_RATE if name == "auth-on" else None
                    key = bench_key(client, redis_url, prefixes[name], rate=rate) if name in ("auth-on", "key-only") else ""
                    result = load(
                        port=ports[name],
                        pid=servers[name].pid,
                        seconds=args.seconds,
                        warmup=args.warmup,
                        connections=args.connections,
                        headers=(f"Authorization: Bearer {key}",) if key else (),
                    )
                    results[name].append(result)
                    print(
                        f"run {run + 1} {name:<9} {result['rate']:>8,.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
                        f"p99 {result['p99_ms']:.2f} ms  non-2xx {result['non_2xx']}  errors {result['errors']}",
                        flush=True,
                    )
                    forget(client, prefixes[name])
                    if name == "key-only" and args.batch:
                        # The same API and a fresh key of the same kind: one batch file of N.
                        key = bench_key(client, redis_url, prefixes[name], rate=None)
                        done = batch_run(
                            port=ports[name], key=key, requests=args.batch, client=client, queue=f"{prefixes[name]}echo"
                        )
                        batch_results.append(done)
                        print(
                            f"run {run + 1} batch     {done['rate']:>8,.0f} jobs/s  {args.batch} jobs in {done['seconds']:.2f} s "
                            f"(upload {done['upload_s']:.2f} s, {done['bytes'] / 1e6:.1f} MB)  status {done['status']}  "
                            f"queued {done['queued']}",
                            flush=True,
                        )
                        forget(client, prefixes[name])
    except StackError as error:
        print(f"bench/submit.py: {error}", file=sys.stderr)
        return 1
    finally:
        for prefix in prefixes.values():
            forget(client, prefix)
        client.close()

    ratio, auth_ratio, metrics_ratio = report(results, args=args)
    batch_ok = True
    if args.batch:
        print(f"{'batch of ' + str(args.batch) + ' echo requests (jobs/s)':<44}{median_of(batch_results, 'rate'):>10,.0f}")
        batch_ratio = ratio_line(
            "ratio batch jobs/s / single creates/s (key)", batch_results, results["key-only"], goal=BATCH_GOAL
        )
        batch_ok = batch_ratio >= args.min_batch_ratio
        if not all(r["ok"] for r in batch_results):
            print(f"batch: FAILED {[r for r in batch_results if not r['ok']]}")
            return 1
    if not all(r["ok"] for each in results.values() for r in each):
        return 1
    ratios_met = ratio >= args.min_ratio and auth_ratio >= args.min_auth_ratio and metrics_ratio >= args.min_metrics_ratio
    return 0 if ratios_met and batch_ok else 2


if __name__ == "__main__":
    sys.exit(main())
