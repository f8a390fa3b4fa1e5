"""``python bench/llm.py``: text throughput through the whole system against raw
``model.generate``, and time to first token, in one run.

Raw baselines run in this process on the same model files, device and dtype as the worker:
``model.generate`` on the same prompts one at a time (sequential), and as one static batch
of n left-padded prompts. Every job is greedy and makes exactly ``--tokens`` new tokens: the
prompts are chosen (by a raw batch before anything is timed) among ones whose greedy text
has no end-of-sequence token that early, and the baselines pass ``min_new_tokens``.

The system is the real thing: Redis (the configured one, or a private one), ``blaze api``
and ``blaze worker --engine llm --max-batch 64`` as child processes under a private key
prefix. For each n, rounds of n jobs are posted at once (``cache: bypass``, so the cache
never answers); tokens/s is completion tokens over the span from the first job's
``created_at`` to the last one's ``completed_at`` in the job records.

Time to first token is that of a job asking for one token (its end is its first token),
``created_at`` to ``completed_at``: on an idle worker, and arriving while ``--late-batch``
long jobs are generating. The same is measured inside this process on ``LLMEngine``
directly (submit to the first streamed piece), which leaves HTTP and Celery out.

Goals (the issue's): at 16 concurrent jobs, at least 5x the tokens/s of sequential single
jobs and at least 0.8 of the raw static batch; a late arrival's first token within 2x an
idle worker's. Exit status: 0 when every job succeeded and the goals were met, 1 when a job
failed or a part did not start, 2 when a goal was missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

from blaze_jobs.settings import get_settings
from blaze_jobs.stack import Stack, StackError
from blaze_jobs.store import Keys
from common import AUTH, broke_off, forget_all, machine, start_api, submit_all, unique_prefix, wait_ended, write_json

GOAL_SEQUENTIAL = 5.0  # at 16 jobs, x the sequential tokens/s
GOAL_STATIC = 0.8  # at 16 jobs, x the raw static batch's tokens/s
GOAL_TTFT = 2.0  # late arrival's first token, x the idle one's
MODEL = "builtin:tiny-lm"


# --- the raw baselines ------------------------------------------------------------------


def load(model: str, model_dir: Path, device: str) -> tuple[Any, Any]:
    """The model and tokenizer as the engine loads them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blaze_jobs.builtin_models import builtin_path

    path = builtin_path(model, model_dir) if model.startswith("builtin:") else model
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    # transformers wraps PreTrainedModel.to with functools.wraps, whose typeshed type leaves self unbound.
    return AutoModelForCausalLM.from_pretrained(path).to(device, dtype).eval(), tokenizer  # type: ignore[arg-type]


def generate(lm: Any, tokenizer: Any, prompts: list[str], tokens: int, *, exact: bool = True) -> Any:
    import torch

    from blaze_jobs.kvcache import attention_kernels

    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(lm.device)
    # The attention kernels the worker uses (on CUDA, not cuDNN's: see kvcache.py), so the
    # baseline is not slowed by a plan built for every new shape.
    with torch.inference_mode(), attention_kernels(lm.device):
        out = lm.generate(
            **batch,
            max_new_tokens=tokens,
            min_new_tokens=tokens if exact else None,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return out[:, batch["input_ids"].shape[1] :]


def pick_prompts(lm: Any, tokenizer: Any, count: int, tokens: int) -> list[str]:
    """``count`` prompts whose greedy text runs ``tokens`` tokens without ending."""
    eos = lm.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    candidates = [
        f"Job {i}: the {word} was cold and clear" for i, word in enumerate(["river", "morning", "market", "lake"] * count)
    ]
    chosen: list[str] = []
    for start in range(0, len(candidates), 64):
        group = candidates[start : start + 64]
        out = generate(lm, tokenizer, group, tokens, exact=False)
        chosen += [p for p, row in zip(group, out.tolist(), strict=True) if not eos & set(row)]
        if len(chosen) >= count:
            return chosen[:count]
    raise RuntimeError(f"only {len(chosen)} prompts run {tokens} tokens greedily without ending")


def raw_sequential(lm: Any, tokenizer: Any, prompts: list[str], tokens: int) -> float:
    started = time.perf_counter()
    for prompt in prompts:
        generate(lm, tokenizer, [prompt], tokens)
    return len(prompts) * tokens / (time.perf_counter() - started)


def raw_static(lm: Any, tokenizer: Any, prompts: list[str], tokens: int, *, calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        generate(lm, tokenizer, prompts, tokens)
        times.append(time.perf_counter() - started)
    return len(prompts) * tokens / statistics.median(times)


def rows_decoding(lm: Any, tokenizer: Any, prompts: list[str], tokens: int, *, together: bool) -> float:
    """Greedy decoding through the worker's own cache (``BatchCache``): every prompt a row
    of one batch, or each its own row stepped alone, which keeps each job's arithmetic
    independent of the others' (text identical whatever the company: docs/workers.md)."""
    import torch

    from blaze_jobs.kvcache import BatchCache

    ids = [tokenizer(p).input_ids for p in prompts]
    groups = [ids] if together else [[row] for row in ids]
    with torch.inference_mode():
        caches = [BatchCache(lm, pad_token_id=tokenizer.pad_token_id) for _ in groups]
        logits = [cache.add(group) for cache, group in zip(caches, groups, strict=True)]
        started = time.perf_counter()
        for _ in range(tokens - 1):
            logits = [cache.step(step.argmax(-1).tolist()) for cache, step in zip(caches, logits, strict=True)]
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
    return len(prompts) * (tokens - 1) / (time.perf_counter() - started)


# --- the system -------------------------------------------------------------------------


def body(prompt: str, tokens: int) -> dict[str, Any]:
    return {"engine": "llm", "cache": "bypass", "input": {"prompt": prompt, "max_new_tokens": tokens, "temperature": 0}}


def fetch_jobs(api_url: str, ids: list[str]) -> list[dict[str, Any]]:
    with httpx.Client(base_url=api_url, timeout=30, headers=AUTH) as client:
        return [client.get(f"/v1/jobs/{job_id}").raise_for_status().json() for job_id in ids]


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def system_tokens_per_s(ctx: dict[str, Any], prompts: list[str], tokens: int, *, rounds: int) -> dict[str, Any]:
    """Rounds of ``len(prompts)`` jobs posted at once; tokens/s over the rounds' spans."""
    made, span, sizes, failed, short = 0, 0.0, [], 0, 0
    for _ in range(rounds):
        ids = submit_all(ctx["api_url"], [body(p, tokens) for p in prompts])
        wait_ended(ctx["redis"], ctx["keys"], ids, worker=ctx["worker"], timeout=ctx["timeout"])
        jobs = fetch_jobs(ctx["api_url"], ids)
        ok = [j for j in jobs if j["status"] == "succeeded"]
        failed += len(jobs) - len(ok)
        made += sum(j["output"]["usage"]["completion_tokens"] for j in ok)
        short += sum(j["output"]["usage"]["completion_tokens"] < tokens for j in ok)
        span += max(_ts(j["completed_at"]) for j in jobs) - min(_ts(j["created_at"]) for j in jobs)
        sizes += [j["metrics"]["batch_size"] or 1 for j in ok]
    return {
        "tokens_per_s": made / span,
        "tokens": made,
        "span_s": round(span, 3),
        "failed": failed,
        "short_jobs": short,
        "mean_batch_per_job": round(sum(sizes) / len(sizes), 2) if sizes else None,
    }


def system_ttft(ctx: dict[str, Any], prompts: list[str], *, probes: int, late_batch: int, late_tokens: int) -> dict[str, Any]:
    """Seconds from creation to end of one-token jobs: on an idle worker, then while
    ``late_batch`` long jobs generate."""

    def probe(i: int, label: str) -> dict[str, Any]:
        (job_id,) = submit_all(ctx["api_url"], [body(f"{prompts[i % len(prompts)]} ({label} probe {i})", 1)])
        wait_ended(ctx["redis"], ctx["keys"], [job_id], worker=ctx["worker"], timeout=ctx["timeout"], poll_s=0.01)
        (job,) = fetch_jobs(ctx["api_url"], [job_id])
        if job["status"] != "succeeded":
            raise RuntimeError(f"a probe job {job['status']}: {job['error']}")
        return job

    def seconds(job: dict[str, Any]) -> float:
        return _ts(job["completed_at"]) - _ts(job["created_at"])

    idle = [probe(i, "idle") for i in range(probes)]
    busy_ids = submit_all(ctx["api_url"], [body(p, late_tokens) for p in (prompts * late_batch)[:late_batch]])
    time.sleep(1.0)  # every long job has started generating
    late = [probe(i, "late") for i in range(probes)]
    wait_ended(ctx["redis"], ctx["keys"], busy_ids, worker=ctx["worker"], timeout=ctx["timeout"])
    busy = fetch_jobs(ctx["api_url"], busy_ids)
    throughout = min(_ts(j["completed_at"]) for j in busy) > max(_ts(j["completed_at"]) for j in late)
    return {
        "idle_s": summary_of([seconds(j) for j in idle]),
        "late_s": summary_of([seconds(j) for j in late]),
        "batch_ran_throughout": throughout,
    }


def summary_of(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def engine_ttft(
    model: str, model_dir: Path, device: str, prompts: list[str], *, probes: int, late_batch: int, late_tokens: int
) -> dict[str, Any]:
    """The same in this process, on ``LLMEngine`` directly: submit to first streamed piece."""
    from blaze_jobs.engines.base import EngineRequest
    from blaze_jobs.engines.llm import LLMEngine

    engine = LLMEngine(model_dir=model_dir, device=device, max_batch=64)
    engine.prepare(model)

    def first_token(i: int) -> float:
        seen: list[float] = []
        started = time.perf_counter()
        data = {"prompt": prompts[i % len(prompts)], "max_new_tokens": 1, "temperature": 0}
        engine.run(EngineRequest(f"p{i}", model, data, on_delta=lambda _: seen.append(time.perf_counter())))
        return (seen[0] if seen else time.perf_counter()) - started

    try:
        idle = [first_token(i) for i in range(probes)]
        long = [
            engine.submit(EngineRequest(f"l{i}", model, {"prompt": p, "max_new_tokens": late_tokens, "temperature": 0}))
            for i, p in enumerate((prompts * late_batch)[:late_batch])
        ]
        time.sleep(0.5)
        late = [first_token(i) for i in range(probes)]
        ran_throughout = not any(f.done() for f in long)
        for f in long:
            f.result()
    finally:
        engine.close()
    return {"idle_s": summary_of(idle), "late_s": summary_of(late), "batch_ran_throughout": ran_throughout}


# --- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="jobs at once")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per job")
    parser.add_argument("--jobs-per-level", type=int, default=64, help="jobs per concurrency level (rounds of n, at least 2)")
    parser.add_argument("--sequential-jobs", type=int, default=8, help="prompts the sequential baseline runs one at a time")
    parser.add_argument("--probes", type=int, default=5, help="one-token jobs per time-to-first-token figure")
    parser.add_argument("--late-batch", type=int, default=16, help="long jobs running while the late probes arrive")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in the baselines and the worker; 0: the library default"
    )
    parser.add_argument("--model", default=MODEL, help="builtin:tiny-lm, or a local path")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", help="also write a JSON summary here")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = get_settings()
    model_dir = (args.model_dir or settings.model_dir).expanduser().resolve()
    lm, tokenizer = load(args.model, model_dir, args.device)
    top = max(args.concurrency)
    late_tokens = args.tokens * 8
    prompts = pick_prompts(lm, tokenizer, max(top, args.sequential_jobs), args.tokens)
    summary: dict[str, Any] = {
        "benchmark": "llm",
        "model": args.model,
        "device": args.device,
        "tokens": args.tokens,
        "torch_threads": torch.get_num_threads(),
        "machine_before": machine(),
        "rows": [],
    }
    print(
        f"llm: {args.model} on {args.device}, {args.tokens} greedy tokens a job, torch threads {torch.get_num_threads()}, "
        f"load average {summary['machine_before']['loadavg']}",
        flush=True,
    )

    # 1. Raw baselines.
    generate(lm, tokenizer, prompts[:4], 8)  # warm-up
    sequential = raw_sequential(lm, tokenizer, prompts[: args.sequential_jobs], args.tokens)
    summary["raw_sequential_tokens_per_s"] = sequential
    print(f"raw generate, one job at a time: {sequential:.0f} tokens/s", flush=True)
    static = {n: raw_static(lm, tokenizer, prompts[:n], args.tokens, calls=2) for n in args.concurrency}
    n_rows = 16 if 16 in args.concurrency else top
    batched_rows, alone_rows = (rows_decoding(lm, tokenizer, prompts[:n_rows], args.tokens, together=t) for t in (True, False))
    summary["rows_decoding"] = {"n": n_rows, "batched_tokens_per_s": batched_rows, "row_by_row_tokens_per_s": alone_rows}
    print(
        f"worker cache, {n_rows} jobs: as one batch {batched_rows:.0f} tokens/s, each row alone (batch invariant) "
        f"{alone_rows:.0f} tokens/s = {batched_rows / alone_rows:.1f}x the price of invariance",
        flush=True,
    )

    # 2. The system, and time to first token.
    prefix = unique_prefix("llm")
    client = None
    try:
        with Stack() as stack:
            redis_url = stack.redis(settings.redis_url)
            client = redis.Redis.from_url(redis_url)
            if redis_url != settings.redis_url:
                print(f"no Redis at {settings.redis_url}; started one at {redis_url}", flush=True)
            env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
            stack.env.update(
                BLAZE_REDIS_URL=redis_url,
                BLAZE_REDIS_PREFIX=prefix,
                BLAZE_MODEL_DIR=str(model_dir),
                BLAZE_LLM_MODEL=args.model,
                BLAZE_DEVICE=args.device,
                HF_HUB_OFFLINE="1",
                **env,
            )
            api, api_url = start_api(stack)
            max_batch = str(max(top, args.late_batch + 1))
            worker = stack.blaze("worker-llm", "worker", "--engine", "llm", "--max-batch", max_batch, BLAZE_MAX_BATCH=max_batch)
            ctx = {"api_url": api_url, "redis": client, "keys": Keys(prefix), "worker": worker, "timeout": args.timeout}
            system_tokens_per_s(ctx, prompts[:2], 4, rounds=1)  # the worker has loaded and is warm
            for n in args.concurrency:
                row = {"n": n, "raw_static_tokens_per_s": static[n]}
                row["system"] = system_tokens_per_s(ctx, prompts[:n], args.tokens, rounds=max(2, args.jobs_per_level // n))
                tps = row["system"]["tokens_per_s"]
                row["x_sequential"], row["x_static"] = tps / sequential, tps / static[n]
                summary["rows"].append(row)
                print(
                    f"n={n:>3}: system {tps:7.0f} tokens/s = {row['x_sequential']:5.2f}x sequential, "
                    f"{row['x_static']:.2f}x raw static batch ({static[n]:.0f} tokens/s); "
                    f"mean batch {row['system']['mean_batch_per_job']}, failed {row['system']['failed']}, "
                    f"short {row['system']['short_jobs']}",
                    flush=True,
                )
            summary["ttft_system"] = system_ttft(
                ctx, prompts, probes=args.probes, late_batch=args.late_batch, late_tokens=late_tokens
            )
            worker.stop()
    except (StackError, RuntimeError) as error:
        return broke_off("bench/llm.py", error, summary, args.json)
    finally:
        forget_all(client, prefix)
    del lm
    summary["ttft_engine"] = engine_ttft(
        args.model, model_dir, args.device, prompts, probes=args.probes, late_batch=args.late_batch, late_tokens=late_tokens
    )

    # 3. Report.
    summary["machine_after"] = machine()
    for where in ("system", "engine"):
        t = summary[f"ttft_{where}"]
        t["x_idle"] = t["late_s"]["median"] / t["idle_s"]["median"]
        print(
            f"time to first token ({where}): idle {t['idle_s']['median'] * 1000:.1f} ms, while {args.late_batch} jobs generate "
            f"{t['late_s']['median'] * 1000:.1f} ms = {t['x_idle']:.2f}x (medians of {args.probes})",
            flush=True,
        )
    at16 = next((r for r in summary["rows"] if r["n"] == 16), None)
    goals = {"ttft": summary["ttft_system"]["x_idle"] <= GOAL_TTFT}
    if at16:
        goals.update(sequential=at16["x_sequential"] >= GOAL_SEQUENTIAL, static=at16["x_static"] >= GOAL_STATIC)
    summary["goals_met"] = goals
    print(
        f"goals: at 16 jobs >= {GOAL_SEQUENTIAL}x sequential and >= {GOAL_STATIC}x the raw static batch; "
        f"late first token <= {GOAL_TTFT}x idle: {goals}; load average now {summary['machine_after']['loadavg']}"
    )
    write_json(args.json, summary)
    if any(r["system"]["failed"] for r in summary["rows"]):
        return 1
    return 0 if all(goals.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
