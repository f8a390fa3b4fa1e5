"""The API's Prometheus metrics: ``blaze api --workers 2`` reports one sum at ``/metrics``
whichever process a scrape reaches (requests by route template, jobs created, refused and
answered from the cache, the queue gauges read from Redis, clients waiting on jobs), a killed
process's waiting clients and private folder are forgotten, a Redis that does not answer costs
a scrape its queue gauges only, and ``BLAZE_METRICS=off`` turns it all off."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from blaze_jobs import cache, metrics
from blaze_jobs.api import connections
from blaze_jobs.api.app import create_app
from blaze_jobs.api.metrics import queues_now
from blaze_jobs.api_keys import create_key
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack, StackError, free_port
from blaze_jobs.store import AsyncJobStore
from tests.conftest import AUTH, wait_until
from tests.metrics_scrape import Samples, samples, value

pytestmark = pytest.mark.timeout(120)

#: The most creates made while waiting for both API processes to have answered some.
MAX_CREATES = 200


def scrape(url: str) -> Samples:
    """One scrape of the API at ``url``."""
    return samples(f"{url}/metrics")


def create(url: str, body: dict[str, Any], *, secret: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else AUTH
    return httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=10)


def dead_pid() -> int:
    """The pid of a process that has ended."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    return ended.pid


def processes_written(folder: Path) -> set[str]:
    """The API processes that wrote counter values (``counter_<pid>.db``)."""
    return {path.stem.split("_")[-1] for path in folder.glob("counter_*.db")}


@pytest.fixture()
def api(own_stack: Stack, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``blaze api --workers 2`` with no worker (its jobs stay queued), writing its metric
    values in a folder the test can see, where a stale file of an earlier run lies; and, in
    the temporary directory, the private metrics folders of a killed ``blaze api`` and of a
    live one (this test's own process stands for it)."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"an earlier run's values, unreadable")
    killed = Path(tempfile.mkdtemp(prefix=f"blaze-api-metrics-{dead_pid()}-"))
    live = Path(tempfile.mkdtemp(prefix=f"blaze-api-metrics-{os.getpid()}-"))
    (killed / "counter_7.db").write_bytes(b"")
    port = free_port()
    child = own_stack.blaze("api", "api", "--port", str(port), "--workers", "2", PROMETHEUS_MULTIPROC_DIR=str(folder))
    url = f"http://127.0.0.1:{port}"
    try:
        own_stack.wait_http("the API", child, f"{url}/readyz", timeout=90)
    except StackError as error:
        pytest.fail(str(error))
    yield {"url": url, "folder": folder, "stack": own_stack, "killed": killed, "live": live}
    shutil.rmtree(killed, ignore_errors=True)
    shutil.rmtree(live, ignore_errors=True)


def test_two_api_processes_report_one_sum_of_requests_creates_refusals_and_queues(api: dict[str, Any]) -> None:
    url, folder, stack = api["url"], api["folder"], api["stack"]
    settings = Settings(redis_url=stack.env["BLAZE_REDIS_URL"], redis_prefix=stack.env["BLAZE_REDIS_PREFIX"])
    with redis.Redis.from_url(settings.redis_url) as client:
        quota_key, _ = create_key(client, settings, tenant="quota", name="metrics", max_jobs=1)
        rate_key, _ = create_key(client, settings, tenant="rate", name="metrics", rate="1/minute")
        openai_key, _ = create_key(client, settings, tenant="openai", name="metrics")
        # And the result of a deterministic echo job in the cache, as a worker stores it
        done = {"seed": 7, "text": "cached"}
        key = cache.cache_key(
            engine="echo", model=settings.default_model("echo"), input=done, tenant=settings.default_tenant, settings=settings
        )
        with client.pipeline() as pipe:
            cache.queue_store(pipe, cache.CacheKeys(settings.redis_prefix), key, json.dumps(done), settings=settings)
            pipe.execute()

    # Given echo jobs created one connection at a time until both API processes made some
    made = 0
    while made < 4 or len(processes_written(folder) - {"1"}) < 2:
        assert made < MAX_CREATES, f"after {made} creates only {processes_written(folder)} wrote values"
        answer = create(url, {"engine": "echo", "input": {"n": made}})
        assert answer.status_code == 202, answer.text
        made += 1
    # And a create refused as invalid, one past its tenant's quota and one past its key's rate
    assert create(url, {"engine": "no-such-engine", "input": {}}).status_code == 422
    assert [create(url, {"engine": "echo"}, secret=quota_key).status_code for _ in range(2)] == [202, 429]
    assert [create(url, {"engine": "echo"}, secret=rate_key).status_code for _ in range(2)] == [202, 429]
    # And a create answered from the cache, and a deterministic one the cache has not seen
    assert create(url, {"engine": "echo", "input": done}).json()["status"] == "succeeded"
    assert create(url, {"engine": "echo", "input": {"seed": 8}}).json()["status"] == "queued"
    # And an OpenAI chat create for a model not served, and one whose job is canceled while it waits
    chat = f"{url}/v1/chat/completions"
    openai_auth = {"Authorization": f"Bearer {openai_key}", "x-stainless-read-timeout": "20"}
    messages = [{"role": "user", "content": "hi"}]
    unknown = httpx.post(chat, json={"model": "no-such-model", "messages": messages}, headers=openai_auth, timeout=10)
    assert unknown.status_code == 404, unknown.text
    answered: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: answered.append(httpx.post(chat, json={"messages": messages}, headers=openai_auth, timeout=30))
    )
    waiting.start()
    try:
        jobs = wait_until(
            lambda: httpx.get(f"{url}/v1/jobs", headers=openai_auth, timeout=10).json()["jobs"],
            timeout=10,
            what="the chat's job listed",
        )
        canceled = httpx.post(f"{url}/v1/jobs/{jobs[0]['id']}/cancel", headers=openai_auth, timeout=10)
        assert canceled.status_code == 200, canceled.text
    finally:
        waiting.join()
    assert answered[0].status_code == 400 and answered[0].json()["error"]["code"] == "job_canceled", answered[0].text
    # And a private folder of a killed API (not of a live one) removed at start
    assert not api["killed"].exists() and api["live"].exists()

    # When each process has written what its requests recorded (every FLUSH_S), and /metrics
    # is scraped several times, on connections of their own
    wait_until(
        lambda: (
            (found := scrape(url))
            and value(found, "blaze_jobs_created_total", engine="echo", surface="blaze") == made + 4
            and value(found, "blaze_http_request_duration_seconds_count", route="/v1/jobs", method="POST") == made + 7
            and value(found, "blaze_http_requests_total", route="/v1/chat/completions", code="400") == 1
        ),
        timeout=10,
        what="both processes' requests written",
    )
    scrapes = [scrape(url) for _ in range(4)]

    # Then every scrape, whichever process answered it, gives the same sums
    for found in scrapes:
        assert value(found, "blaze_jobs_created_total", engine="echo", surface="blaze") == made + 4
        assert value(found, "blaze_http_requests_total", route="/v1/jobs", method="POST", code="202") == made + 4
        assert value(found, "blaze_http_request_duration_seconds_count", route="/v1/jobs", method="POST") == made + 7
        assert value(found, "blaze_jobs_cached_total", engine="echo") == 1
        assert value(found, "blaze_cache_lookups_total", engine="echo", layer="redis", result="hit") == 1
        assert value(found, "blaze_cache_lookups_total", engine="echo", layer="redis", result="miss") == 1
        # And a create refused is counted once (the model not served under its route's engine),
        # a create whose job ended badly not at all
        assert value(found, "blaze_jobs_rejected_total", engine="", reason="invalid") == 1
        assert value(found, "blaze_jobs_rejected_total", engine="llm", reason="invalid") == 1
        assert value(found, "blaze_jobs_rejected_total", reason="invalid") == 2
        assert value(found, "blaze_jobs_created_total", engine="llm", surface="openai") == 1
        assert value(found, "blaze_http_requests_total", route="/v1/chat/completions", code="400") == 1
        assert value(found, "blaze_jobs_rejected_total", engine="echo", reason="quota") == 1
        assert value(found, "blaze_jobs_rejected_total", reason="rate_limit") == 1
        # And the queue gauges count the jobs left queued (not the one born from the cache)
        assert value(found, "blaze_queue_depth", engine="echo") == made + 3
        assert value(found, "blaze_queue_depth", engine="webhooks") == 0
        assert value(found, "blaze_queue_oldest_age_seconds", engine="echo") > 0
        assert value(found, "blaze_queue_oldest_age_seconds", engine="diffusion") == 0


def test_a_route_is_labelled_by_its_template_and_waiting_clients_are_counted(api: dict[str, Any]) -> None:
    url = api["url"]

    def written(found: Samples) -> Samples | None:
        """A scrape, once it counts the event stream's request: the last one made, counted when
        its stream is done, by whichever process answered it."""
        return found if value(found, "blaze_http_requests_total", route="/v1/jobs/{job_id}/events") else None

    # Given a queued job, read by its id, and a path no route takes
    job_id = create(url, {"engine": "echo"}).json()["id"]
    assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=AUTH, timeout=10).status_code == 200
    missing = f"/no/such/{uuid.uuid4().hex}"
    assert httpx.get(f"{url}{missing}", timeout=10).status_code == 404

    # When a client long-polls the job (it stays queued: no worker runs it)
    waited: list[int] = []
    poll = threading.Thread(
        target=lambda: waited.append(httpx.get(f"{url}/v1/jobs/{job_id}?wait=3", headers=AUTH, timeout=10).status_code)
    )
    poll.start()
    try:
        # Then /metrics counts it, whichever process holds it, while it waits
        wait_until(
            lambda: value(scrape(url), "blaze_event_clients", kind="long_poll") == 1,
            timeout=5,
            what="one long-poll counted",
        )
    finally:
        poll.join()
    assert waited == [200]
    assert value(scrape(url), "blaze_event_clients", kind="long_poll") == 0

    # When a client follows the job's event stream, then goes away before it ends
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=AUTH, timeout=10) as stream:
        assert stream.status_code == 200
        # Then it is counted while it follows, and no more once it left
        wait_until(lambda: value(scrape(url), "blaze_event_clients", kind="sse") == 1, timeout=5, what="one stream counted")
    wait_until(
        lambda: value(scrape(url), "blaze_event_clients", kind="sse") == 0,
        timeout=5,
        what="the stream's end counted",
    )
    # And requests are labelled by the template, a path no route took by one fixed label (once
    # the process that answered them has written them)
    found = wait_until(lambda: written(scrape(url)), timeout=10, what="the event stream's request written")
    assert value(found, "blaze_http_requests_total", route="/v1/jobs/{job_id}", method="GET", code="200") == 2
    assert value(found, "blaze_http_requests_total", route="/v1/jobs/{job_id}/events", code="200") == 1
    assert value(found, "blaze_http_requests_total", route="unmatched", code="404") == 1
    routes = {dict(labels).get("route") for (_, labels) in found}
    assert not any(job_id in str(route) or missing in str(route) for route in routes)

    # When an API process that was killed left three event streams counted in its file
    dead = dead_pid()
    left = api["folder"] / f"gauge_livesum_{dead}.db"
    values = MmapedDict(str(left))
    name = "blaze_event_clients"
    values.write_value(mmap_key(name, name, ["kind"], ["sse"], metrics.STREAMS_OPEN._documentation), 3.0, 0.0)
    values.close()
    # Then a scrape leaves them out of the sum, and its file is gone
    assert value(scrape(url), "blaze_event_clients", kind="sse") == 0
    assert not left.exists()


def test_metrics_off_records_nothing_and_answers_404(settings: Settings) -> None:
    # Given the API made with BLAZE_METRICS=off
    app = create_app(settings.model_copy(update={"metrics": False}))
    with TestClient(app) as http:
        # When it answers a request, and /metrics is asked for
        assert http.get("/healthz").status_code == 200
        answer = http.get("/metrics")
    # Then /metrics is not found, and recording is off in the process
    assert answer.status_code == 404
    assert not metrics.enabled()
    assert "/metrics" not in app.openapi()["paths"]


def test_with_a_metrics_token_only_its_bearer_reads_the_metrics(settings: Settings) -> None:
    # Given the API made with BLAZE_METRICS_TOKEN set
    app = create_app(settings.model_copy(update={"metrics_token": "scrape-secret"}))
    with TestClient(app) as http:
        # When /metrics is asked for without the token, with another, and with it
        bare = http.get("/metrics")
        wrong = http.get("/metrics", headers={"Authorization": "Bearer another"})
        right = http.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
    # Then only the token's bearer reads them; the others get a 401 problem
    assert (bare.status_code, wrong.status_code) == (401, 401)
    assert bare.headers["content-type"].startswith("application/problem+json")
    assert "BLAZE_METRICS_TOKEN" in bare.json()["detail"]
    assert right.status_code == 200 and "blaze_http_requests_total" in right.text


@pytest.mark.timeout(30)
def test_a_redis_that_does_not_answer_leaves_the_queue_gauges_out_after_a_second(settings: Settings) -> None:
    # Given an API whose Redis takes connections and never answers (a listening socket nobody reads)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        mute = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{silent.getsockname()[1]}/0"})
        app = create_app(mute)

        async def two_scrapes() -> tuple[list[Any], bool]:
            app.state.redis = connections.connect(mute)
            app.state.store = AsyncJobStore(app.state.redis, mute)
            try:
                # When two scrapes ask for the queue gauges at once
                readings = await asyncio.gather(queues_now(app), queues_now(app))
                return list(readings), app.state.queue_read.done()
            finally:
                app.state.queue_read.cancel()
                await asyncio.gather(app.state.queue_read, return_exceptions=True)
                await app.state.redis.aclose()

        readings, done = asyncio.run(two_scrapes())
    # Then both give up on them (after QUEUES_WAIT_S) while the one read they share goes on
    assert readings == [None, None]
    assert not done
