"""``python bench/webhooks.py``: what pushing results costs, against raw baselines measured in
the same run.

1. Delivery latency. ``blaze api``, an echo worker and a webhook worker run as child
   processes under a private key prefix; a receiver listens on 127.0.0.1 in this process.
   ``--jobs`` echo jobs with a ``completed`` webhook are posted at ``--rate`` per second.
   Latency is from the job's ``completed_at`` (in the delivered body) to the moment the
   receiver has read the request and answers 2xx. Two raw baselines, at the same rate and
   body size: a bare sender process (BRPOP from Redis, then POST: the least a queue-fed
   sender does), timed from the LPUSH; and one signed POST from this process (HTTP alone).

2. The cost of progress reporting on diffusion throughput:
   * engine: ``DiffusionEngine.run_batch`` in this process, each job's step callback wired
     to the real ``ProgressReporter`` (writing to Redis, jobs in ``running``) or to nothing,
     alternating call by call; the paired on/off ratios of wall and process-CPU time, and
     the reporter's own parts timed directly (a step callback; one send), from which its
     share of an image's CPU time follows without the noise of a shared machine;
   * system: ``bench/batching.py``'s saturating run through the API and a diffusion worker
     started with ``BLAZE_PROGRESS_INTERVAL_S=0.5`` or ``0`` (off), interleaved, with the
     worker's CPU seconds per image.
   Torch runs ``--threads`` threads (1 by default): on a busy 2-core machine the default
   two spinning threads make timings swing by several times.

Exit status: 0 when every job succeeded and the reporter's measured share of an image's CPU
time stayed under ``GOAL_COST``, 1 when something failed, 2 when the goal was missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.receiver

from blaze_jobs.settings import get_settings
from blaze_jobs.signing import new_secret, signed_headers
from blaze_jobs.stack import Stack, StackError
from common import AUTH, cpu_seconds, forget, latency_summary, machine, start_api, unique_prefix, write_json
from progress_cost import engine_progress_cost, system_progress_cost
from tests.receiver import Receiver

#: The issue's goal: progress reporting costs diffusion throughput under 2 %.
GOAL_COST = 0.02


# --- 1. delivery latency ------------------------------------------------------------------


def delivery_latency(
    stack: Stack, api_url: str, receiver: Receiver, *, jobs: int, rate: float, sender_pid: int
) -> dict[str, Any]:
    path = f"/bench/{uuid.uuid4().hex[:8]}"
    hook = receiver.url(path)
    with httpx.Client(base_url=api_url, timeout=30, headers=AUTH) as http:
        # Warm-up: the workers' first tasks, connections and code paths.
        for n in range(10):
            http.post(
                "/v1/jobs", json={"engine": "echo", "input": {"warm": n}, "webhook": hook, "webhook_events_filter": ["completed"]}
            )
        receiver.wait_for(path, 10, timeout=60)
        cpu_before = cpu_seconds(sender_pid)
        ids = []
        started = time.monotonic()
        for n in range(jobs):
            # Open loop: jobs come at the rate whether or not deliveries keep up.
            pause = started + n / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            body = {"engine": "echo", "input": {"n": n}, "webhook": hook, "webhook_events_filter": ["completed"]}
            ids.append(http.post("/v1/jobs", json=body).raise_for_status().json()["id"])
    got = receiver.wait_for(path, 10 + jobs, timeout=120)[10:]
    cpu_after = cpu_seconds(sender_pid)
    cpu_ms = (cpu_after - cpu_before) / jobs * 1000 if cpu_before is not None and cpu_after is not None else None
    latencies, sizes = [], []
    for request in got:
        event = json.loads(request.body)
        completed_at = datetime.fromisoformat(event["data"]["completed_at"]).timestamp()
        latencies.append(request.at - completed_at)
        sizes.append(len(request.body))
    return {
        "summary": latency_summary(latencies),
        "body_bytes": int(statistics.median(sizes)),
        "jobs": len(got),
        "sender_cpu_ms": cpu_ms,
    }


def raw_post_latency(receiver: Receiver, *, posts: int, body_bytes: int) -> dict[str, Any]:
    """One signed POST of a body of the same size, from here to the same receiver."""
    path = f"/raw/{uuid.uuid4().hex[:8]}"
    secret = new_secret()
    body = json.dumps({"type": "job.completed", "data": {"pad": "x" * max(0, body_bytes - 40)}}).encode()
    sent = []
    with httpx.Client(timeout=10) as http:
        for n in range(posts + 10):
            headers = {**signed_headers(secret, msg_id=f"msg_{n}", body=body), "content-type": "application/json"}
            before = time.time()
            http.post(receiver.url(path), content=body, headers=headers).raise_for_status()
            sent.append(before)
    got = receiver.wait_for(path, posts + 10, timeout=30)
    return {"summary": latency_summary([r.at - t for r, t in zip(got[10:], sent[10:], strict=True)])}


#: The least a queue-fed webhook sender does: pop a message from Redis, POST it.
BARE_SENDER = """
import json, sys
import httpx, redis
client, key = redis.Redis.from_url(sys.argv[1]), sys.argv[2]
with httpx.Client(timeout=10) as http:
    while True:
        message = json.loads(client.brpop(key)[1])
        if message.get("stop"):
            break
        http.post(message["url"], content=message["body"], headers={"content-type": "application/json"})
"""


def bare_sender_latency(redis_url: str, receiver: Receiver, *, messages: int, rate: float, body_bytes: int) -> dict[str, Any]:
    """From an LPUSH to the receiver, through a bare sender process (BRPOP, then POST)."""
    path, key = f"/bare/{uuid.uuid4().hex[:8]}", f"blaze-bench-bare-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    sender = subprocess.Popen([sys.executable, "-c", BARE_SENDER, redis_url, key])
    pad = "x" * max(0, body_bytes - 60)
    sent: list[float] = []
    cpu_before = None
    try:
        started = time.monotonic()
        for n in range(messages + 10):
            if n == 10:
                cpu_before = cpu_seconds(sender.pid)
            pause = started + n / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            sent.append(time.time())
            client.lpush(key, json.dumps({"url": receiver.url(path), "body": json.dumps({"n": n, "pad": pad})}))
        got = receiver.wait_for(path, messages + 10, timeout=60)
        cpu_after = cpu_seconds(sender.pid)
    finally:
        client.lpush(key, json.dumps({"stop": True}))
        sender.wait(timeout=10)
        client.delete(key)
        client.close()
    cpu_ms = (cpu_after - cpu_before) / messages * 1000 if cpu_before is not None and cpu_after is not None else None
    return {"summary": latency_summary([r.at - t for r, t in zip(got[10:], sent[10:], strict=True)]), "sender_cpu_ms": cpu_ms}


# --- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="echo jobs whose webhook latency is measured")
    parser.add_argument("--rate", type=float, default=30.0, help="jobs posted per second")
    parser.add_argument("--pairs", type=int, default=20, help="engine calls with and without progress, alternating (0: skip)")
    parser.add_argument("--batch", type=int, default=1, help="diffusion batch size")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--system-rounds", type=int, default=1, help="with/without-progress pairs through the system (0: skip)")
    parser.add_argument("--system-batch", type=int, default=4, help="the system worker's --max-batch")
    parser.add_argument("--system-jobs", type=int, default=6, help="jobs per system run, as a multiple of --system-batch")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 …")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, here and in the system's worker (0: the library default); "
        "on a busy 2-core machine the default's spinning threads make timings meaningless",
    )
    parser.add_argument(
        "--sd15", action="store_true", help="a random-weight SD 1.5-shaped pipeline (bench/batching.py's; for a GPU at 512)"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="where models are built (default BLAZE_MODEL_DIR)")
    parser.add_argument("--json", help="also write a JSON summary here")
    args = parser.parse_args(argv)

    settings = get_settings()
    model_dir = (args.model_dir or settings.model_dir).expanduser().resolve()
    model = settings.diffusion_model
    if args.pairs or args.system_rounds:
        from batching import build_sd15

        if args.sd15:
            model = str(build_sd15(model_dir, device=args.device))
    prefix = unique_prefix("webhooks")
    summary: dict[str, Any] = {"machine": machine(), "args": {**vars(args), "model_dir": str(model_dir)}, "model": model}
    receiver = Receiver()
    try:
        with Stack() as stack:
            redis_url = stack.redis(settings.redis_url)
            client = redis.Redis.from_url(redis_url)
            stack.env.update(
                BLAZE_REDIS_URL=redis_url,
                BLAZE_REDIS_PREFIX=prefix,
                BLAZE_MODEL_DIR=str(model_dir),
                BLAZE_DIFFUSION_MODEL=model,
                BLAZE_DEVICE=args.device,
                BLAZE_WEBHOOK_ALLOW_PRIVATE="1",
                PYTHONUNBUFFERED="1",
            )
            try:
                api, api_url = start_api(stack)
                if not args.skip_latency:
                    print(f"delivery latency: {args.jobs} echo jobs at {args.rate:g}/s, webhook on completion", flush=True)
                    stack.blaze("worker-echo", "worker", "--engine", "echo", "--concurrency", "4")
                    webhooks = stack.blaze("worker-webhooks", "worker", "--engine", "webhooks")
                    system = delivery_latency(stack, api_url, receiver, jobs=args.jobs, rate=args.rate, sender_pid=webhooks.pid)
                    bare = bare_sender_latency(
                        redis_url, receiver, messages=args.jobs, rate=args.rate, body_bytes=system["body_bytes"]
                    )
                    raw = raw_post_latency(receiver, posts=args.jobs, body_bytes=system["body_bytes"])
                    summary["latency"] = {"system": system, "bare_sender": bare, "raw_post": raw}
                    s, q, b = system["summary"], bare["summary"], raw["summary"]
                    print(
                        f"  completion → receiver (system)  p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:8.2f} ms"
                        f"  (n {s['n']}, {system['body_bytes']} B bodies)"
                    )
                    print(f"  LPUSH → receiver (bare sender)  p50 {q['p50_ms']:7.2f} ms  p99 {q['p99_ms']:8.2f} ms")
                    print(f"  signed POST alone               p50 {b['p50_ms']:7.2f} ms  p99 {b['p99_ms']:8.2f} ms")
                    print(
                        f"  system / bare sender            p50 {s['p50_ms'] / q['p50_ms']:.2f}×"
                        f"  p99 {s['p99_ms'] / q['p99_ms']:.2f}×"
                    )
                    print(
                        f"  sender CPU per delivery: webhook worker {system['sender_cpu_ms'] or math.nan:.2f} ms,"
                        f" bare sender {bare['sender_cpu_ms'] or math.nan:.2f} ms",
                        flush=True,
                    )
                if args.pairs:
                    print(
                        f"progress cost, engine: {args.pairs} pairs of calls, batch {args.batch}, {model} {args.size}px, "
                        f"{args.steps} steps, {args.device}, torch threads {args.threads or 'default'}",
                        flush=True,
                    )
                    engine = engine_progress_cost(
                        pairs=args.pairs,
                        batch=args.batch,
                        size=args.size,
                        steps=args.steps,
                        prefix=prefix,
                        redis_url=redis_url,
                        model=model,
                        model_dir=model_dir,
                        device=args.device,
                        threads=args.threads,
                    )
                    summary["progress_engine"] = engine
                    w, c = engine["wall_ratio_on_off"], engine["cpu_ratio_on_off"]
                    print(f"  images/s off {engine['images_per_s_off']:.3f}, on {engine['images_per_s_on']:.3f} (medians)")
                    print(
                        f"  time on/off per pair: wall {w['median']:.4f} (IQR {w['q1']:.4f}–{w['q3']:.4f}),"
                        f" CPU {c['median']:.4f} (IQR {c['q1']:.4f}–{c['q3']:.4f})"
                    )
                    print(
                        f"  reporter: {engine['callback_us']:.2f} µs per step callback,"
                        f" {engine['send_ms_cpu']:.3f} ms CPU per send; "
                        f"{engine['reporter_cpu_s_per_image'] * 1000:.3f} ms per image of {engine['cpu_s_per_image_off']:.3f} s: "
                        f"cost {engine['cost'] * 100:.3f} %",
                        flush=True,
                    )
                if args.system_rounds:
                    print(
                        f"progress cost, system: {args.system_rounds} rounds, max batch {args.system_batch},"
                        f" {args.system_jobs}×B jobs per run",
                        flush=True,
                    )
                    system_cost = system_progress_cost(stack, api_url, api.pid, rounds=args.system_rounds, args=args)
                    summary["progress_system"] = system_cost
                    print(
                        f"  off {system_cost['images_per_s_off']:.3f} images/s,"
                        f" on {system_cost['images_per_s_on']:.3f} images/s, "
                        f"on/off {system_cost['ratio_on_off']:.4f};"
                        f" worker CPU s/image on/off {system_cost['cpu_ratio_on_off']:.4f}",
                        flush=True,
                    )
            finally:
                forget(client, prefix)
                client.close()
    except (StackError, RuntimeError, httpx.HTTPError, AssertionError) as error:
        print(f"bench/webhooks.py: {error}", file=sys.stderr)
        return 1
    finally:
        receiver.close()
    summary["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    write_json(args.json, summary)
    cost = summary.get("progress_engine", {}).get("cost")
    return 2 if cost is not None and cost > GOAL_COST else 0


if __name__ == "__main__":
    sys.exit(main())
