"""``blaze``: run Blaze Jobs (demo, up, api, worker, flower), talk to its API (submit,
status, cancel, jobs, workers, top) and manage its keys. Every part is configured by
``BLAZE_*`` environment variables."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

from blaze_jobs import cli_keys, cli_progress, cli_views
from blaze_jobs.cli_views import api_client
from blaze_jobs.client import APIError, BlazeClient
from blaze_jobs.settings import ENGINES, get_settings
from blaze_jobs.stack import (
    Interrupted,
    Stack,
    StackError,
    flower_login,
    free_port,
    interrupted_by_signals,
    local_key,
    preferred_port,
    redis_reachable,
    revoke_local_key,
    start_services,
)

#: How often ``blaze demo`` looks at its children while it waits for its job: a dead
#: worker runs nothing, so the demo says so within seconds instead of at its timeout.
WATCH_S = 2.0


def _exec(argv: list[str]) -> None:
    """Become the given Python module's process, keeping this pid (so stopping it by pid works)."""
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *argv])


def cmd_api(args: argparse.Namespace) -> int:
    if get_settings().auth == "off" and not _loopback(args.host):
        # With auth off every caller is an admin: only this machine may be one.
        print(
            f"blaze api: BLAZE_AUTH=off makes every caller an admin; it listens on loopback only, not {args.host}",
            file=sys.stderr,
        )
        return 2
    _exec(["-m", "blaze_jobs.api", "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)])
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    metrics = [] if args.metrics_port is None else ["--metrics-port", str(args.metrics_port), "--metrics-host", args.metrics_host]
    if args.engine == "webhooks":
        concurrency = ["--concurrency", str(args.concurrency)] if args.concurrency else []
        _exec(["-m", "blaze_jobs.workers.webhooks", *concurrency, *metrics])
    argv = ["-m", "blaze_jobs.workers.engine", "--engine", args.engine]
    for flag, value in (
        ("--device", args.device),
        ("--max-batch", args.max_batch),
        ("--max-wait-ms", args.max_wait_ms),
        ("--concurrency", args.concurrency),
    ):
        if value is not None:
            argv += [flag, str(value)]
    _exec([*argv, *metrics])
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_flower(args: argparse.Namespace) -> int:
    auth = get_settings().flower_basic_auth
    if not _loopback(args.host):
        if not auth:
            print(
                f"blaze flower: refusing to serve on {args.host!r} without a login: set BLAZE_FLOWER_BASIC_AUTH=user:password",
                file=sys.stderr,
            )
            return 2
        print(
            "blaze flower: Flower answers /metrics and /healthcheck without the login (it exempts them); "
            f"anyone who reaches {args.host}:{args.port} can read its metrics",
            file=sys.stderr,
        )
    if auth:
        # Flower reads FLOWER_* variables as its options. In the environment the password is
        # readable only by this user; on the command line anyone sees it in `ps`.
        os.environ["FLOWER_BASIC_AUTH"] = auth
    _exec(["-m", "celery", "-A", "blaze_jobs.celery_app:app", "flower", f"--port={args.port}", f"--address={args.host}"])
    return 0


def parse_inputs(pairs: list[str]) -> dict[str, Any]:
    """``["prompt=a red fox", "seed=7"]`` -> ``{"prompt": "a red fox", "seed": 7}``: values
    that read as JSON (numbers, true, objects) are taken as JSON, anything else as text."""
    result: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--input {pair!r}: expected NAME=VALUE")
        try:
            result[name] = json.loads(value)
        except ValueError:
            result[name] = value
    return result


def timeline(job: dict[str, Any]) -> str:
    """The job's life as lines a person reads: when it was queued, started and finished."""

    def clock(value: str | None) -> str:
        return datetime.fromisoformat(value).astimezone().strftime("%H:%M:%S.%f")[:-3] if value else "-"

    metrics = job["metrics"]
    lines = [f"job {job['id']} {job['status']} (engine {job['engine']}, model {job['model']})"]
    lines.append(f"  queued    {clock(job['created_at'])}")
    if job["started_at"]:
        lines.append(f"  started   {clock(job['started_at'])}   queue time {metrics['queue_time_s']:.3f} s")
    if job["completed_at"]:
        run = f"   run time   {metrics['run_time_s']:.3f} s" if metrics["run_time_s"] is not None else ""
        lines.append(f"  finished  {clock(job['completed_at'])}{run}")
    if job["error"]:
        lines.append(f"  error     {job['error']['type']}: {job['error']['message']}")
    return "\n".join(lines)


def artifacts_of(output: Any) -> list[dict[str, Any]]:
    """The artifacts (``{"url": ".../v1/artifacts/<key>", ...}``) an output refers to, in the
    order they appear, whatever the engine (images, audio, files)."""
    found: list[dict[str, Any]] = []
    pending = [output]
    while pending:  # a stack, not recursion: an output may nest deeply
        value = pending.pop()
        if isinstance(value, dict):
            url = value.get("url")
            if isinstance(url, str) and "/v1/artifacts/" in url:
                found.append(value)
            pending.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            pending.extend(reversed(value))
    return found


def save_artifacts(client: BlazeClient, job: dict[str, Any], out: Path) -> list[Path]:
    """Write the job's artifacts (its images …) to ``out`` (``out-1.png`` … when there are several)."""
    artifacts = artifacts_of(job.get("output"))
    paths = []
    for i, artifact in enumerate(artifacts):
        path = out if len(artifacts) == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
        path.write_bytes(client.download(artifact["url"]))
        paths.append(path)
    return paths


def cmd_submit(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        job = client.submit(args.engine, parse_inputs(args.input), model=args.model, webhook=args.webhook)
        if not args.wait and not args.out and not args.stream:
            print(json.dumps(job, indent=2))
            return 0
        print(f"submitted job {job['id']}", file=sys.stderr)
        if args.stream:
            job = stream_text(client, job["id"])
            print(timeline(job), file=sys.stderr)
            return 0 if job["status"] == "succeeded" else 1
        # A bar where the progress is drawn (stderr) is a terminal; plain lines anywhere else.
        live = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        job = cli_progress.follow(client, job, timeout=args.timeout, out=sys.stderr, live=live)
        print(timeline(job))
        if args.out and job["status"] == "succeeded":
            for path in save_artifacts(client, job, Path(args.out)):
                print(f"wrote {path}")
        return 0 if job["status"] == "succeeded" else 1


def stream_text(client: BlazeClient, job_id: str) -> dict[str, Any]:
    """Print a text job's output to stdout as it is generated; returns the job once it ended."""
    printed, job = "", None
    for event in client.events(job_id):
        if event.event == "job.delta":
            sys.stdout.write(event.data["text"])
            sys.stdout.flush()
            printed += event.data["text"]
        elif event.final:
            job = event.data
    job = job or client.get(job_id)
    # Whatever was not streamed (all of it, from a worker that does not stream) comes now.
    text = (job.get("output") or {}).get("text") or ""
    print(text[len(printed) :] if text.startswith(printed) else "", flush=True)
    return job


def cmd_status(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        print(json.dumps(client.get(args.job_id), indent=2))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        job = client.cancel(args.job_id)
    print(f"job {job['id']} {job['status']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``blaze demo``: bring everything up, make one image over HTTP, write it, stop."""
    prompt, out, timeout = args.prompt, Path(args.out), args.timeout
    settings = get_settings()
    # A prefix of its own, so the demo never takes jobs of a deployment sharing this Redis.
    prefix = f"blaze-demo-{os.getpid()}:"
    with interrupted_by_signals(), Stack() as stack:
        redis_url = stack.redis(settings.redis_url)
        where = "embedded Redis" if redis_url != settings.redis_url else "Redis"
        print(f"using {where} at {redis_url}", flush=True)
        stack.env.update(BLAZE_REDIS_URL=redis_url, BLAZE_REDIS_PREFIX=prefix)
        flower_port = preferred_port(5555)
        login = flower_login(stack, settings)
        try:
            # The key lives under the demo's prefix, so it goes with the demo's other keys.
            api_key = local_key(settings, redis_url=redis_url, prefix=prefix, name="demo")
            api_url = start_services(stack, api_port=free_port(), flower_port=flower_port, engines=("diffusion",))
            print(f"API {api_url} (docs {api_url}/docs), Flower http://127.0.0.1:{flower_port} {login}", flush=True)
            if api_key:
                print(f"API key of this demo (an admin key, gone when the demo ends):\n{api_key}", flush=True)
            with BlazeClient(api_url, api_key=api_key or None) as client:
                job = client.submit("diffusion", {"prompt": prompt})
                print(f"submitted job {job['id']}; waiting for the diffusion worker", flush=True)
                job = _wait_watching(stack, client, job["id"], timeout=timeout)
                print(timeline(job))
                if job["status"] != "succeeded":
                    worker = stack.child("worker-diffusion")
                    print(f"blaze demo: the job {job['status']}; worker log:\n{worker.log_tail()}", file=sys.stderr)
                    return 1
                for path in save_artifacts(client, job, out):
                    image = job["output"]["images"][0]
                    size = f"{image['width']}x{image['height']}"
                    print(f"wrote {path} ({size} {image['content_type']}, sha256 {image['sha256'][:12]}…)")
            return 0
        finally:
            stack.stop()
            _forget(redis_url, prefix)


def _wait_watching(stack: Stack, client: BlazeClient, job_id: str, *, timeout: float) -> dict[str, Any]:
    """The job once it has ended, as ``client.wait`` gives it; a child of the stack that
    exits meanwhile ends the wait with its log (nothing would run the job)."""
    deadline = time.monotonic() + timeout
    while True:
        dead = stack.first_dead()
        if dead is not None:
            raise StackError(f"{dead.name} exited with code {dead.process.returncode}:\n{dead.log_tail()}")
        try:
            return client.wait(job_id, timeout=max(0.0, min(WATCH_S, deadline - time.monotonic())))
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise


def _forget(redis_url: str, prefix: str) -> None:
    """Delete every key the demo wrote (jobs, artifacts, Celery's queue bindings)."""
    if not redis_reachable(redis_url):
        return
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)


def cmd_up(args: argparse.Namespace) -> int:
    """``blaze up``: the demo's stack with a worker of every engine, kept running until
    Ctrl-C, SIGTERM or SIGHUP, which all stop every child. It makes an admin key for the
    operator (revoked when it stops) and a Flower login unless BLAZE_FLOWER_BASIC_AUTH is set."""
    settings = get_settings()
    with interrupted_by_signals(), Stack() as stack:
        redis_url = stack.redis(settings.redis_url)
        stack.env["BLAZE_REDIS_URL"] = redis_url
        login = flower_login(stack, settings)
        api_key = ""
        try:
            api_key = local_key(settings, redis_url=redis_url, prefix=settings.redis_prefix, name="local")
            api_url = start_services(stack, api_port=args.port, flower_port=args.flower_port, engines=(*ENGINES, "webhooks"))
            print(f"Redis   {redis_url}")
            print(f"API     {api_url}")
            print(f"docs    {api_url}/docs")
            print(f"Flower  http://127.0.0.1:{args.flower_port} {login}")
            print(f"logs    {stack.log_dir}")
            if api_key:
                print(f"API key (an admin key of tenant {settings.default_tenant}, revoked when blaze up stops):")
                print(api_key)
                print(f"  export BLAZE_API_KEY={api_key}   (blaze submit and BlazeClient read it)")
            else:
                print("API key none needed: BLAZE_AUTH=off makes every caller an admin")
            print("Ctrl-C stops everything.", flush=True)
            while (dead := stack.first_dead()) is None:
                time.sleep(0.5)
            print(f"blaze up: {dead.name} exited with code {dead.process.returncode}:\n{dead.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as interrupt:
            print(f"stopping ({interrupt})" if isinstance(interrupt, Interrupted) else "stopping", flush=True)
            return 0
        finally:
            if api_key:
                try:
                    revoke_local_key(settings, redis_url=redis_url, prefix=settings.redis_prefix, secret=api_key)
                except redis.RedisError as error:
                    print(f"blaze up: could not revoke its API key: {error}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blaze", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # What every command that talks to the API takes.
    api_caller = argparse.ArgumentParser(add_help=False)
    api_caller.add_argument("--api-key", help="the API key to send (default BLAZE_API_KEY)")

    demo = commands.add_parser("demo", help="start everything, make one image end to end, stop")
    demo.add_argument("prompt", help="what the image should show")
    demo.add_argument("--out", default="blaze-demo.png", help="where to write the image")
    demo.add_argument("--timeout", type=float, default=600, help="seconds to wait for the job")
    demo.set_defaults(func=cmd_demo)

    up = commands.add_parser("up", help="start Redis (if needed), the API, workers and Flower; stop on Ctrl-C")
    up.add_argument("--port", type=int, default=8000, help="API port")
    up.add_argument("--flower-port", type=int, default=5555)
    up.set_defaults(func=cmd_up)

    api = commands.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="uvicorn processes")
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", help="run jobs of one engine on one device")
    worker.add_argument("--engine", required=True, choices=(*ENGINES, "webhooks"), help="an engine, or webhooks (deliveries)")
    worker.add_argument("--device", help="cpu, cuda:0 … (default BLAZE_DEVICE)")
    worker.add_argument("--max-batch", type=int, help="most jobs in one batch (default BLAZE_MAX_BATCH)")
    worker.add_argument("--max-wait-ms", type=float, help="longest wait for a fuller batch (default BLAZE_MAX_WAIT_MS)")
    worker.add_argument("--concurrency", type=int, help="task threads (default: twice the max batch)")
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: none)")
    worker.add_argument("--metrics-host", default="127.0.0.1", help="the address --metrics-port listens on")
    worker.set_defaults(func=cmd_worker)

    flower = commands.add_parser("flower", help="serve Flower, the Celery monitor (login: BLAZE_FLOWER_BASIC_AUTH)")
    flower.add_argument("--host", default="127.0.0.1", help="address to listen on; beyond loopback it needs a login")
    flower.add_argument("--port", type=int, default=5555)
    flower.set_defaults(func=cmd_flower)

    submit = commands.add_parser("submit", parents=[api_caller], help="submit a job over HTTP (BLAZE_API_URL)")
    submit.add_argument("--engine", required=True, choices=ENGINES)
    submit.add_argument("--model")
    submit.add_argument("--webhook", help="a URL that receives the job's events as signed POSTs")
    submit.add_argument("--input", action="append", default=[], metavar="NAME=VALUE", help="an input field (repeat)")
    submit.add_argument(
        "--wait", action="store_true", help="wait for the job to end, showing its progress, and print its timeline"
    )
    submit.add_argument("--out", help="write the job's image here (implies --wait)")
    submit.add_argument("--stream", action="store_true", help="print a text job's output as it is generated (implies --wait)")
    submit.add_argument("--timeout", type=float, default=600)
    submit.set_defaults(func=cmd_submit)

    status = commands.add_parser("status", parents=[api_caller], help="print a job")
    status.add_argument("job_id")
    status.set_defaults(func=cmd_status)

    cancel = commands.add_parser("cancel", parents=[api_caller], help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=cmd_cancel)

    cli_views.add_parsers(commands, api_caller)
    cli_keys.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except APIError as error:
        print(f"blaze: {error}", file=sys.stderr)
        for problem in error.problem.get("errors", []):
            print(f"  {problem['field']}: {problem['message']}", file=sys.stderr)
        return 2
    except httpx.HTTPError as error:
        print(f"blaze: cannot reach the API at {get_settings().api_url}: {error}", file=sys.stderr)
        return 1
    except (ValueError, TimeoutError, OSError, RuntimeError) as error:
        print(f"blaze: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
