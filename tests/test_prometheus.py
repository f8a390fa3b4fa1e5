"""A real Prometheus server (Debian's ``prometheus``) scraping a real API and echo worker: after
jobs run through the API, PromQL over Prometheus's HTTP API counts exactly those jobs, their
creates and their run times; and every query of the Grafana dashboard and of docs/metrics.md is
one Prometheus runs."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from blaze_jobs.client import BlazeClient
from blaze_jobs.stack import Child, Stack, StackError, free_port
from tests import metrics_scrape
from tests.conftest import start_api, wait_for_workers, wait_until
from tests.test_deploy import dashboard, dashboard_queries, doc_queries

PROMETHEUS = shutil.which("prometheus")
JOBS = 5

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary: install Debian's prometheus package (.ci/run does)"),
]


def query(prometheus: httpx.Client, promql: str) -> list[dict[str, Any]]:
    """The instant vector ``promql`` gives now; fails on any error Prometheus answers."""
    answer = prometheus.get("/api/v1/query", params={"query": promql})
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def value(prometheus: httpx.Client, promql: str) -> float:
    """The one value a PromQL expression gives now."""
    (sample,) = query(prometheus, promql)
    return float(sample["value"][1])


def start_prometheus(stack: Stack, tmp_path: Path, targets: dict[str, str]) -> tuple[Child, str]:
    """Prometheus scraping each ``targets`` job (name: host:port) every second; its child and URL."""
    config = tmp_path / "prometheus.yml"
    jobs = [{"job_name": name, "static_configs": [{"targets": [target]}]} for name, target in targets.items()]
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
    port = free_port()
    assert PROMETHEUS is not None
    argv = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
    argv += [f"--web.listen-address=127.0.0.1:{port}"]
    child = stack.start("prometheus", argv)
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http("prometheus", child, f"{url}/-/ready", timeout=30)
    except StackError as error:
        child.stop()
        pytest.fail(str(error))
    return child, url


def test_prometheus_counts_the_jobs_run_through_the_api(own_stack: Stack, tmp_path: Path) -> None:
    # Given an echo worker serving metrics, an API, and a real Prometheus scraping both every second
    worker_port = free_port()
    own_stack.blaze("worker-echo", "worker", "--engine", "echo", "--metrics-port", str(worker_port))
    api_url = start_api(own_stack)
    api_target = api_url.removeprefix("http://")
    child, prometheus_url = start_prometheus(own_stack, tmp_path, {"api": api_target, "worker": f"127.0.0.1:{worker_port}"})
    try:
        with BlazeClient(api_url) as client, httpx.Client(base_url=prometheus_url, timeout=10) as prometheus:
            wait_for_workers(api_url, 1)

            # When JOBS echo jobs run to their end through the API
            jobs = [client.submit("echo", {"n": n}) for n in range(JOBS)]
            assert all(client.wait(job["id"], timeout=60)["status"] == "succeeded" for job in jobs)
            # and the worker and the API have counted them (the worker counts just after the
            # job's end is written; the API a request once its answer is sent)
            ended = f"http://127.0.0.1:{worker_port}/metrics"
            wait_until(
                lambda: metrics_scrape.value(metrics_scrape.samples(ended), "blaze_jobs_ended_total", status="succeeded") >= JOBS,
                timeout=10,
                what="ended",
            )
            posts = f"{api_url}/metrics"
            wait_until(
                lambda: (
                    metrics_scrape.value(
                        metrics_scrape.samples(posts), "blaze_http_requests_total", route="/v1/jobs", method="POST"
                    )
                    >= JOBS
                ),
                timeout=10,
                what="creates",
            )
            counted = time.time()
            # and Prometheus has scraped both since
            wait_until(
                lambda: len(query(prometheus, f"timestamp(up == 1) > {counted}")) == 2,
                timeout=20,
                what="a scrape of both targets after the jobs were counted",
                interval=0.2,
            )

            # Then PromQL counts exactly the jobs run
            assert value(prometheus, "sum(blaze_jobs_created_total)") == JOBS
            assert value(prometheus, 'sum(blaze_jobs_ended_total{status="succeeded"})') == JOBS
            assert value(prometheus, "sum(blaze_job_run_seconds_count)") == JOBS
            assert value(prometheus, "sum(blaze_job_queue_wait_seconds_count)") == JOBS
            assert value(prometheus, 'sum(blaze_http_requests_total{route="/v1/jobs",method="POST"})') == JOBS
            # and their run times give a quantile inside the histogram's buckets
            p95 = value(prometheus, "histogram_quantile(0.95, sum by (le) (blaze_job_run_seconds_bucket))")
            assert math.isfinite(p95) and 0 < p95 <= 1800, p95
            # and the queue gauges the API reads from Redis are scraped: the echo queue is empty
            assert value(prometheus, 'blaze_queue_depth{engine="echo"}') == 0

            # and every query of the Grafana dashboard (as Grafana sends it, variables filled in)
            # and of docs/metrics.md is one Prometheus runs
            for expr in [*dashboard_queries(dashboard()), *doc_queries()]:
                query(prometheus, expr.replace("$__rate_interval", "1m").replace("$engine", ".*"))
    finally:
        child.stop()
