"""``blaze jobs``, ``blaze workers`` and ``blaze top``: the tenant's recent jobs, the live
workers and the queues, as tables read from the API (``GET /v1/jobs``, ``/v1/workers``,
``/v1/queues``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from blaze_jobs.client import APIConnectionError, APIError, BlazeClient
from blaze_jobs.jobs import JobStatus
from blaze_jobs.settings import ENGINES, get_settings

#: The most of a job's input ``blaze jobs`` shows (its prompt, or its JSON).
INPUT_CHARS = 40
#: What a terminal is told to show ``blaze top`` on: a screen of its own (restored at the end),
#: cleared for each frame.
ALTERNATE_SCREEN, MAIN_SCREEN, CLEAR = "\x1b[?1049h", "\x1b[?1049l", "\x1b[H\x1b[2J"


def api_client(args: argparse.Namespace) -> BlazeClient:
    """A client of the API at BLAZE_API_URL, with the key of ``--api-key`` (else BLAZE_API_KEY)."""
    return BlazeClient(get_settings().api_url, api_key=args.api_key)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: frozenset[str] = frozenset()) -> str:
    """Rows under a header, in columns as wide as their widest cell; ``right`` columns (numbers)
    are aligned right."""
    widths = [max([len(name), *(len(row[i]) for row in rows)]) for i, name in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if name in right else c.ljust(w) for c, w, name in zip(cells, widths, header, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s" if value < 60 else f"{value / 60:.1f} min"


def moment(iso: str | None) -> str:
    """A time as a person reads it here: the clock today, the date too on other days."""
    if not iso:
        return "-"
    at = datetime.fromisoformat(iso).astimezone()
    return at.strftime("%H:%M:%S" if at.date() == datetime.now().astimezone().date() else "%Y-%m-%d %H:%M")


def input_summary(input: Any) -> str:
    text = input.get("prompt") if isinstance(input, dict) else None
    if not isinstance(text, str):
        text = json.dumps(input, separators=(",", ":"))
    text = " ".join(text.split())
    return text if len(text) <= INPUT_CHARS else text[: INPUT_CHARS - 1] + "…"


def jobs_table(jobs: list[dict[str, Any]]) -> str:
    header = ("ID", "STATUS", "ENGINE", "MODEL", "CREATED", "QUEUE", "RUN", "BATCH", "INPUT")
    rows = [
        (
            job["id"],
            job["status"],
            job["engine"],
            job["model"],
            moment(job["created_at"]),
            seconds(job["metrics"]["queue_time_s"]),
            seconds(job["metrics"]["run_time_s"]),
            "cache" if job["metrics"]["cache_hit"] else str(job["metrics"]["batch_size"] or "-"),
            input_summary(job["input"]),
        )
        for job in jobs
    ]
    return table(header, rows, right=frozenset({"QUEUE", "RUN", "BATCH"}))


def cmd_jobs(args: argparse.Namespace) -> int:
    """``blaze jobs``: a page of the tenant's jobs, newest first, with the filters of ``GET /v1/jobs``."""
    with api_client(args) as client:
        page = client.list_jobs(status=args.status, engine=args.engine, limit=args.limit, cursor=args.cursor)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    print(jobs_table(page["jobs"]) if page["jobs"] else "no jobs")
    if page["next_cursor"]:
        # On stderr: the table on stdout stays a table for whatever reads it.
        print(f"more: add --cursor {page['next_cursor']}", file=sys.stderr)
    return 0


def workers_table(workers: list[dict[str, Any]], *, now: float) -> str:
    header = ("NAME", "ENGINE", "DEVICE", "MODELS", "BREAKER", "BUSY", "JOBS RUN", "BATCHES", "MEAN BATCH", "LAST BEAT")
    rows = []
    for worker in sorted(workers, key=lambda w: (w.get("engine", ""), w.get("name", ""))):
        breaker = worker.get("breaker") or {}
        failures = breaker.get("consecutive_failures")
        state = breaker.get("state", "-") + (f" ({failures} failing)" if failures else "")
        mean = worker.get("mean_batch_size")
        rows.append(
            (
                worker.get("name", "-"),
                worker.get("engine", "-"),
                worker.get("device", "-"),
                ",".join(worker.get("models") or []) or "-",
                state,
                # Jobs the worker holds a lease on: running, or waiting on its batcher.
                str(worker.get("jobs_held", 0)),
                str(worker.get("jobs_run", 0)),
                str(worker.get("batches_run", 0)),
                "-" if mean is None else f"{mean:g}",
                f"{max(0.0, now - worker['heartbeat_at']):.1f} s ago" if worker.get("heartbeat_at") else "-",
            )
        )
    return table(header, rows, right=frozenset({"BUSY", "JOBS RUN", "BATCHES", "MEAN BATCH", "LAST BEAT"}))


def cmd_workers(args: argparse.Namespace) -> int:
    """``blaze workers``: the live workers (``GET /v1/workers``, for an admin key)."""
    with api_client(args) as client:
        workers = client.workers()
    if args.json:
        print(json.dumps(workers, indent=2))
        return 0
    print(workers_table(workers, now=time.time()) if workers else "no live workers")
    return 0


def queues_table(queues: list[dict[str, Any]], workers: list[dict[str, Any]] | None = None) -> str:
    """Each queue's depth and oldest job; with the workers (an admin's view), how many serve
    each engine and how many jobs they hold."""
    header: tuple[str, ...] = ("QUEUE", "DEPTH", "OLDEST")
    rows = [[q["engine"], str(q["depth"]), seconds(q["oldest_age_s"])] for q in queues]
    if workers is not None:
        header += ("WORKERS", "OPEN", "BUSY")
        for row in rows:
            serving = [w for w in workers if w.get("engine") == row[0]]
            opened = sum(1 for w in serving if (w.get("breaker") or {}).get("state") == "open")
            row += [str(len(serving)), str(opened), str(sum(w.get("jobs_held", 0) for w in serving))]
    return table(header, rows, right=frozenset(header[1:]))


def top_frame(client: BlazeClient) -> str:
    """One frame of ``blaze top``: the queues, then the workers (or why they cannot be shown)."""
    parts = [f"blaze top   {client.base_url}   {datetime.now().strftime('%H:%M:%S')}", ""]
    queues = client.queues()
    try:
        workers: list[dict[str, Any]] | None = client.workers()
    except APIError as error:
        if error.status != 403:
            raise
        workers = None
    parts += [queues_table(queues, workers), ""]
    if workers is None:
        parts.append("workers: only an admin key sees them (GET /v1/workers)")
    else:
        parts.append(workers_table(workers, now=time.time()) if workers else "no live workers")
    return "\n".join(parts)


def _frame_or_why(client: BlazeClient) -> str:
    """A frame, or why there is none this time: a watch outlives an API restarting, a key
    revoked meanwhile, and shows what went wrong until it comes right."""
    try:
        return top_frame(client)
    except (APIError, APIConnectionError) as error:
        return f"blaze top: {error}"


def cmd_top(args: argparse.Namespace) -> int:
    """``blaze top``: queues and workers, drawn again every ``--interval`` seconds until
    Ctrl-C; on a terminal in a screen of its own, elsewhere as frames one after another."""
    with api_client(args) as client:
        if args.once:
            print(top_frame(client))
            return 0
        if not sys.stdout.isatty():
            try:
                while True:
                    print(_frame_or_why(client), flush=True)
                    time.sleep(args.interval)
                    print()
            except KeyboardInterrupt:
                return 0
        sys.stdout.write(ALTERNATE_SCREEN)
        try:
            while True:
                frame = _frame_or_why(client)
                sys.stdout.write(f"{CLEAR}{frame}\n(Ctrl-C to stop)")
                sys.stdout.flush()
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
        finally:
            sys.stdout.write(MAIN_SCREEN)
            sys.stdout.flush()


def at_least_one(value: str) -> int:
    """``--limit``: a whole number of at least 1 (the API bounds it above)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def positive_seconds(value: str) -> float:
    """``--interval``: seconds, more than none."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {value}")
    return number


def add_parsers(commands: Any, api_caller: argparse.ArgumentParser) -> None:
    """``blaze jobs``, ``blaze workers`` and ``blaze top``, on the ``blaze`` parser's subcommands."""
    jobs = commands.add_parser("jobs", parents=[api_caller], help="list the tenant's recent jobs, newest first")
    jobs.add_argument("--status", choices=[s.value for s in JobStatus], help="only jobs in this status")
    jobs.add_argument("--engine", choices=ENGINES, help="only jobs of this engine")
    jobs.add_argument("--limit", type=at_least_one, help="jobs on the page (default 50, at most BLAZE_LIST_LIMIT_MAX)")
    jobs.add_argument("--cursor", help="the page after the one that printed this cursor")
    jobs.add_argument("--json", action="store_true", help="print the page as the API answered it")
    jobs.set_defaults(func=cmd_jobs)

    workers = commands.add_parser("workers", parents=[api_caller], help="list the live workers (an admin key)")
    workers.add_argument("--json", action="store_true", help="print the workers as the API answered")
    workers.set_defaults(func=cmd_workers)

    top = commands.add_parser("top", parents=[api_caller], help="queues and workers, refreshed live until Ctrl-C")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--interval", type=positive_seconds, default=1.0, help="seconds between frames (default 1)")
    top.set_defaults(func=cmd_top)
