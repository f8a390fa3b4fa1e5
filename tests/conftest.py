"""Shared fixtures: a real Redis under a key prefix of this run's own, and a real stack
(``blaze api``, ``blaze worker`` processes, Flower) started once per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from blaze_jobs.client import BlazeClient
from blaze_jobs.settings import ENGINES, Settings
from blaze_jobs.stack import Stack, StackError, free_port, redis_reachable, redis_refusal
from tests.receiver import Receiver

#: The Redis the tests use; each run writes only under its own prefix and deletes it after.
#: When none answers there, pytest_configure starts a private one and points this at it.
REDIS_URL = os.environ.get("BLAZE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FLOWER_AUTH = "blaze:test-secret"
#: The test stack's BLAZE_ADMIN_TOKEN: clients that read the webhook secret send it.
ADMIN_TOKEN = "blaze-test-admin-token"
#: What the tests' own HTTP calls to the API send: the admin token, an admin key of the
#: default tenant. ``BlazeClient`` sends it unasked (``BLAZE_API_KEY``, set below).
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
os.environ["BLAZE_API_KEY"] = ADMIN_TOKEN

_private_redis: Stack | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Use the Redis at ``BLAZE_TEST_REDIS_URL`` if one answers and keeps keys, else start a
    private server (as ``blaze demo`` does) for this run, so the suite needs nothing installed
    beside it. Test modules import REDIS_URL after this runs, and every process inherits the
    variable."""
    global REDIS_URL, _private_redis
    if redis_reachable(REDIS_URL) and redis_refusal(REDIS_URL) is None:
        return
    _private_redis = Stack(log_dir=Path(tempfile.mkdtemp(prefix="blaze-test-redis-")))
    REDIS_URL = _private_redis.redis(REDIS_URL)
    os.environ["BLAZE_TEST_REDIS_URL"] = REDIS_URL


def pytest_unconfigure(config: pytest.Config) -> None:
    if _private_redis is not None:
        _private_redis.stop()
        shutil.rmtree(_private_redis.log_dir, ignore_errors=True)


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail saying what was last seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; last saw {last!r}")


def delete_keys(prefix: str, *, redis_url: str | None = None) -> None:
    """Delete every key under ``prefix`` (nothing if that Redis is gone: a test stopped it)."""
    try:
        with redis.Redis.from_url(redis_url or REDIS_URL) as client:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
    except redis.RedisError:
        pass


@contextmanager
def own_prefix(name: str) -> Iterator[str]:
    """A fresh key prefix for ``name``'s tests, whose keys are deleted after."""
    prefix = f"blaze-test-{name}-{uuid.uuid4().hex[:8]}:"
    try:
        yield prefix
    finally:
        delete_keys(prefix)


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    with own_prefix("session") as prefix:
        yield prefix


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built-in models are built once per run and shared by every worker the tests start.
    return Path(os.environ.get("BLAZE_TEST_MODEL_DIR") or tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def test_env(redis_prefix: str, model_dir: Path) -> dict[str, str]:
    """The environment every process of the test stack runs with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLAZE_")}
    env.update(
        BLAZE_REDIS_URL=REDIS_URL,
        BLAZE_REDIS_PREFIX=redis_prefix,
        BLAZE_MODEL_DIR=str(model_dir),
        BLAZE_FLOWER_BASIC_AUTH=FLOWER_AUTH,
        BLAZE_ADMIN_TOKEN=ADMIN_TOKEN,
        # Webhook receivers in tests listen on 127.0.0.1, and retries come within seconds.
        BLAZE_WEBHOOK_ALLOW_PRIVATE="1",
        BLAZE_WEBHOOK_RETRY_SCHEDULE="0.2,0.5,1",
        BLAZE_WEBHOOK_TIMEOUT_S="2",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def settings(test_env: dict[str, str]) -> Settings:
    return Settings(redis_url=test_env["BLAZE_REDIS_URL"], redis_prefix=test_env["BLAZE_REDIS_PREFIX"])


#: Test-run options of the session's workers, by engine: the rest start with the defaults.
WORKER_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    # One task thread: a second echo job waits in the queue (the cancel tests rely on it).
    "echo": (("--concurrency", "1"), {}),
    # One torch thread for the text worker: on two cores shared by every process here,
    # a second thread spins waiting for the first and slows each step several times over.
    "llm": ((), {"OMP_NUM_THREADS": "1"}),
}


@pytest.fixture(scope="session")
def stack(test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``blaze api``, a worker of every engine and one for webhooks, and Flower, as real processes."""
    with Stack(env=test_env, log_dir=tmp_path_factory.mktemp("stack-logs")) as running:
        api_port, flower_port = free_port(), free_port()
        running.blaze("flower", "flower", "--port", str(flower_port))
        api = running.blaze("api", "api", "--port", str(api_port))
        # A worker of every registered engine, and one for webhooks.
        workers = {
            name: running.blaze(f"worker-{name}", "worker", "--engine", name, *args, **env)
            for name, (args, env) in ((name, WORKER_OPTIONS.get(name, ((), {}))) for name in (*ENGINES, "webhooks"))
        }
        api_url = f"http://127.0.0.1:{api_port}"
        flower_url = f"http://127.0.0.1:{flower_port}"
        try:
            running.wait_http("the API", api, f"{api_url}/readyz", timeout=60)
            user, password = FLOWER_AUTH.split(":")

            flower_http = httpx.Client(base_url=flower_url, auth=(user, password), timeout=2)

            def flower_sees_workers() -> bool:
                dead = running.first_dead()
                if dead is not None:
                    raise StackError(f"{dead.name} exited with code {dead.process.returncode}:\n{dead.log_tail()}")
                try:
                    # ?status=1 answers from the events Flower has seen (worker heartbeats).
                    answer = flower_http.get("/api/workers", params={"status": 1})
                except httpx.HTTPError:
                    return False
                return answer.status_code == 200 and sum(answer.json().values()) >= len(workers)

            # Every worker up and known to Flower: those with models have loaded them.
            with flower_http:
                running.wait_for("the workers (as Flower sees them)", None, flower_sees_workers, timeout=150)
        except StackError as error:
            pytest.fail(str(error))
        yield {"api_url": api_url, "flower_url": flower_url, "flower_auth": (user, password), "stack": running}


@pytest.fixture()
def client(stack: dict[str, Any]) -> Iterator[BlazeClient]:
    with BlazeClient(stack["api_url"]) as api:
        yield api


@pytest.fixture()
def http(stack: dict[str, Any]) -> Iterator[httpx.Client]:
    """Raw HTTP to the API, for checking status codes and headers."""
    with httpx.Client(base_url=stack["api_url"], timeout=30, headers=AUTH) as session:
        yield session


@pytest.fixture()
def own_stack(test_env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    """An empty stack of this test's own, under a fresh key prefix: the test starts the
    processes it needs (with its own settings) and they all stop, by pid, when it ends."""
    prefix = f"blaze-test-{uuid.uuid4().hex[:8]}:"
    with Stack(env={**test_env, "BLAZE_REDIS_PREFIX": prefix}, log_dir=tmp_path) as running:
        yield running
    delete_keys(prefix, redis_url=running.env["BLAZE_REDIS_URL"])


def start_api(stack: Stack, **env: str) -> str:
    """Start ``blaze api`` in ``stack``; returns its URL once it is ready."""
    port = free_port()
    api = stack.blaze("api", "api", "--port", str(port), **env)
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http("the API", api, f"{url}/readyz", timeout=60)
    except StackError as error:
        pytest.fail(str(error))
    return url


def wait_for_workers(api_url: str, count: int, *, timeout: float = 120) -> list[dict[str, Any]]:
    """Wait until ``GET /v1/workers`` lists ``count`` workers (they publish once loaded)."""

    def listed() -> list[dict[str, Any]] | None:
        workers = httpx.get(f"{api_url}/v1/workers", timeout=5, headers=AUTH).json()["workers"]
        return workers if len(workers) >= count else None

    return wait_until(listed, timeout=timeout, what=f"{count} workers in GET /v1/workers", interval=0.2)


def unique(text: str) -> str:
    """``text`` made this test's own (a prompt no other job asked, so no cache hit)."""
    return f"{text} {uuid.uuid4().hex[:8]}"


@pytest.fixture()
def openai_api(stack: dict[str, Any]) -> Iterator[openai.OpenAI]:
    """The real ``openai`` client, pointed at the stack: the three lines a user changes."""
    with openai.OpenAI(api_key=ADMIN_TOKEN, base_url=stack["api_url"] + "/v1", timeout=60, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """A real webhook receiver on 127.0.0.1 (``tests/receiver.py``)."""
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
def secret(stack: dict[str, Any]) -> str:
    """The ``whsec_`` secret the test stack signs webhooks with."""
    with BlazeClient(stack["api_url"], admin_token=ADMIN_TOKEN) as api:
        return api.webhook_secret()
