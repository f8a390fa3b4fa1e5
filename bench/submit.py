"""``python bench/submit.py``: the API's submit path against a bare endpoint, in one run.

Submitting is the API's hot path. The baseline is the least any submit endpoint can do:
a FastAPI app in its own uvicorn process (one worker, uvloop + httptools, as ``blaze api``
serves) that validates a small pydantic body, sends one pipelined HSET + LPUSH with
redis.asyncio and answers 202. The real API (``blaze api``) takes ``POST /v1/jobs`` with the
same echo body under the same load: the load generator runs in its own process, so on two
cores the server has one and the generator the other. It prints both rates, p50/p99 and
the ratio; the goal is at least ``GOAL``.

Nothing consumes the queues: every key either server wrote is deleted at the end (and
between runs, so each run starts from the same Redis). Exit status: 0 when every response
was 2xx and the ratio met ``--min-ratio``, 1 when any request failed, 2 when the ratio fell
short.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel

from blaze_jobs.settings import get_settings
from blaze_jobs.stack import Stack, StackError, free_port

HOST = "127.0.0.1"
LOADGEN = Path(__file__).resolve().with_name("loadgen.py")
#: The body both servers get: an echo job, the cheapest engine, so only the API is measured.
JOB = {"engine": "echo", "input": {"prompt": "a lighthouse at dusk"}}
#: The issue's target: the real submit path keeps at least this share of the bare rate.
GOAL = 0.8


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


def load(*, port: int, pid: int, seconds: float, warmup: float, connections: int) -> dict[str, Any]:
    """Run the load generator in its own process against ``POST /v1/jobs`` on ``port``."""
    argv = [sys.executable, str(LOADGEN), "--port", str(port), "--path", "/v1/jobs", "--body", json.dumps(JOB)]
    argv += ["--connections", str(connections), "--seconds", str(seconds), "--warmup", str(warmup)]
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


def report(base: list[dict[str, Any]], blaze: list[dict[str, Any]], *, args: argparse.Namespace) -> float:
    ratios = [b["rate"] / a["rate"] if a["rate"] else 0.0 for a, b in zip(base, blaze, strict=True)]
    ratio = median_of(blaze, "rate") / median_of(base, "rate") if median_of(base, "rate") else 0.0
    runs = f", median of {len(base)} runs" if len(base) > 1 else ""
    print(f"\nsubmit: {args.connections} connections, {args.seconds:g} s measured after {args.warmup:g} s warm-up{runs}")
    print(f"{'endpoint':<44}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'server µs/req':>14}{'loadgen µs':>12}{'failed':>8}")
    print(row("bare validate + HSET + LPUSH" + (" (gc.freeze)" if args.bare_gc_freeze else ""), base))
    print(row("POST /v1/jobs (blaze api)", blaze))
    verdict = "met" if ratio >= GOAL else "NOT met"
    per_run = ", ".join(f"{r:.2f}" for r in ratios)
    print(
        f"{'ratio blaze / bare':<44}{ratio:>10.2f}   goal >= {GOAL}: {verdict}"
        + (f"   (runs: {per_run})" if len(ratios) > 1 else "")
    )
    for name, results in (("bare", base), ("blaze", blaze)):
        for result in results:
            if not result["ok"]:
                print(
                    f"{name}: FAILED statuses={result['statuses']} errors={result['errors']}"
                    f" {result['error_samples']} {result['failure_sample']}"
                )
    return ratio


# --- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per endpoint and run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load before each window")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1, help="alternate the endpoints this many times; report medians")
    parser.add_argument("--min-ratio", type=float, default=GOAL, help="exit 2 when the ratio is below this")
    parser.add_argument(
        "--bare-gc-freeze", action="store_true", help="give the bare endpoint blaze api's gc.freeze() after start-up too"
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
    base_prefix, blaze_prefix = f"{tag}-bare:", f"{tag}:"
    client = redis.Redis.from_url(redis_url)
    base_results: list[dict[str, Any]] = []
    blaze_results: list[dict[str, Any]] = []
    try:
        with Stack() as stack:
            stack.env.update(BLAZE_REDIS_URL=redis_url)
            base_port, blaze_port = free_port(), free_port()
            bare_argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve-baseline",
                str(base_port),
                "--prefix",
                base_prefix,
            ]
            bare = stack.start("bare", bare_argv + (["--bare-gc-freeze"] if args.bare_gc_freeze else []))
            api = stack.blaze("api", "api", "--port", str(blaze_port), BLAZE_REDIS_PREFIX=blaze_prefix)
            stack.wait_http("the bare server", bare, f"http://{HOST}:{base_port}/healthz", timeout=60)
            stack.wait_http("the API", api, f"http://{HOST}:{blaze_port}/readyz", timeout=60)
            targets = {"bare": (base_port, bare.pid, base_results), "blaze": (blaze_port, api.pid, blaze_results)}
            for run in range(args.runs):
                # Alternate which goes first, so a drift in the machine favours neither.
                for name in ("bare", "blaze") if run % 2 == 0 else ("blaze", "bare"):
                    port, pid, results = targets[name]
                    result = load(port=port, pid=pid, seconds=args.seconds, warmup=args.warmup, connections=args.connections)
                    results.append(result)
                    print(
                        f"run {run + 1} {name:<5} {result['rate']:>8,.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
                        f"p99 {result['p99_ms']:.2f} ms  non-2xx {result['non_2xx']}  errors {result['errors']}",
                        flush=True,
                    )
                    forget(client, base_prefix if name == "bare" else blaze_prefix)
    except StackError as error:
        print(f"bench/submit.py: {error}", file=sys.stderr)
        return 1
    finally:
        for prefix in (base_prefix, blaze_prefix):
            forget(client, prefix)
        client.close()

    ratio = report(base_results, blaze_results, args=args)
    if not all(r["ok"] for r in base_results + blaze_results):
        return 1
    return 0 if ratio >= args.min_ratio else 2


if __name__ == "__main__":
    sys.exit(main())
