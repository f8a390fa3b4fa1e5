"""The deployment files agree with the code: every series the Grafana dashboard queries is one
Blaze Jobs exports, the dashboard reads the data source Grafana is given, Prometheus scrapes
the API and every worker service of docker-compose.yml on the port that worker serves, and
nothing watching the fleet is published beyond this host's loopback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from blaze_jobs import metrics
from blaze_jobs.api.metrics import QueueGauges
from tests.test_flower import compose_value

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
#: The cluster-wide gauges the API reads from Redis at scrape time (api/metrics.py).
QUEUE_GAUGES = {family.name for family in QueueGauges([], retries=0, now=0.0).collect()}
#: The sample names each kind of metric writes, after its family name.
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}
#: PromQL's keywords, which read like names.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}


def families() -> dict[str, str]:
    """Every metric ``blaze_jobs.metrics`` defines: its family name and its type."""
    return {
        family.name: family.type
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
    }


def exported_series() -> set[str]:
    """Every sample name the metrics of ``blaze_jobs.metrics`` write, and the queue gauges."""
    return set(QUEUE_GAUGES).union(*({name + suffix for suffix in SUFFIXES[kind]} for name, kind in families().items()))


def series_in(expr: str) -> set[str]:
    """The series names a PromQL expression reads (not its functions, labels or keywords)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)  # matchers, ranges ($__rate_interval)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)  # grouping labels
    return {name for name in re.findall(r"\b[a-zA-Z_:][\w:]*\b(?!\s*\()", bare) if name not in KEYWORDS}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "grafana" / "blaze.json").read_text())
    return loaded


def graph_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's panels that query, rows' nested panels included."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        found += graph_panels(panel) if panel.get("panels") else []
        if panel["type"] != "row":
            found.append(panel)
    return found


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: its panels' and its variables'."""
    exprs = [target["expr"] for panel in graph_panels(board) for target in panel["targets"]]
    for variable in board["templating"]["list"]:
        found = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"])
        assert found, f"variable {variable['name']}: {variable['definition']!r}"
        exprs.append(found[1])
    return exprs


def doc_queries() -> list[str]:
    """The example PromQL of docs/metrics.md: each line of its promql blocks but comments."""
    blocks = re.findall(r"```promql\n(.*?)```", (ROOT / "docs" / "metrics.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def worker_services(compose: dict[str, Any]) -> dict[str, list[str]]:
    """The compose services that run ``blaze worker``, with their commands."""
    services = compose["services"].items()
    return {name: service["command"] for name, service in services if service.get("command", [])[:2] == ["blaze", "worker"]}


def scraped(config: dict[str, Any]) -> dict[str, set[tuple[str, int]]]:
    """By scrape job: the (host, port) pairs Prometheus reaches, static or by DNS lookup."""
    targets: dict[str, set[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        found = targets.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            found.update((host, int(port)) for host, port in (target.rsplit(":", 1) for target in static["targets"]))
        for dns in job.get("dns_sd_configs", []):
            found.update((name, int(dns["port"])) for name in dns["names"])
    return targets


def option(command: list[str], name: str) -> str:
    assert name in command, f"{command} has no {name}"
    return command[command.index(name) + 1]


def test_the_dashboard_queries_only_series_blaze_jobs_exports() -> None:
    # Given every PromQL expression of the dashboard
    exprs = dashboard_queries(dashboard())
    exported = exported_series()

    # Then each reads at least one series, and only series some Blaze Jobs process exports
    used: set[str] = set()
    for expr in exprs:
        names = series_in(expr)
        assert names, f"no series found in {expr!r}"
        assert names <= exported, f"{expr!r} reads {sorted(names - exported)}, which nothing exports"
        used |= names
    # and the views an operator opens it for are all there
    wanted = {
        "blaze_queue_depth",
        "blaze_queue_oldest_age_seconds",
        "blaze_jobs_created_total",
        "blaze_jobs_ended_total",
        "blaze_job_queue_wait_seconds_bucket",
        "blaze_job_run_seconds_bucket",
        "blaze_batch_size_bucket",
        "blaze_batch_fill_ratio_sum",
        "blaze_device_busy_seconds_total",
        "blaze_breaker_state",
        "blaze_webhook_deliveries_total",
        "blaze_webhook_delivery_latency_seconds_bucket",
        "blaze_webhook_retries_waiting",
        "blaze_http_requests_total",
        "blaze_http_request_duration_seconds_bucket",
        "blaze_event_clients",
    }
    assert wanted <= used, f"the dashboard shows nothing of {sorted(wanted - used)}"


def test_the_docs_name_every_metric_and_query_only_exported_series() -> None:
    # Given the operators' page on metrics
    text = (ROOT / "docs" / "metrics.md").read_text()

    # Then it names every metric Blaze Jobs defines, as scraped (a counter with its _total), and the queue gauges
    scraped_as = {name + ("_total" if kind == "counter" else "") for name, kind in families().items()} | QUEUE_GAUGES
    unnamed = {name for name in scraped_as if f"`{name}`" not in text}
    assert not unnamed, f"docs/metrics.md does not name {sorted(unnamed)}"
    # and its example queries read only exported series
    exprs = doc_queries()
    assert exprs
    for expr in exprs:
        assert series_in(expr) <= exported_series(), expr


def test_the_series_reader_tells_series_from_functions_labels_and_keywords() -> None:
    expr = 'sum by (engine, le) (rate(blaze_x_bucket{engine=~"$engine", a="b(c)"}[$__rate_interval])) / on (engine) up'
    expr += " or vector(0)"
    assert series_in(expr) == {"blaze_x_bucket", "up"}


def test_the_dashboard_reads_the_provisioned_prometheus() -> None:
    # Given the data source Grafana is provisioned with, and the dashboard provider's folder
    sources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    (source,) = sources
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    board = dashboard()

    # Then every panel, query and variable names that data source by its uid
    uses = [panel["datasource"] for panel in graph_panels(board)]
    uses += [target["datasource"] for panel in graph_panels(board) for target in panel["targets"]]
    uses += [variable["datasource"] for variable in board["templating"]["list"]]
    assert uses and all(use == {"type": "prometheus", "uid": source["uid"]} for use in uses), uses
    # and panels have unique ids and every query a unique refId within its panel
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in graph_panels(board):
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


def test_prometheus_scrapes_the_api_and_every_worker_of_the_compose_file() -> None:
    # Given the compose file and the Prometheus configuration it mounts
    compose = load_yaml(ROOT / "docker-compose.yml")
    config = load_yaml(DEPLOY / "prometheus.yml")
    targets = set().union(*scraped(config).values())
    workers = worker_services(compose)
    assert {"worker-diffusion", "worker-llm", "worker-echo", "worker-webhooks"} <= set(workers)

    # Then the API is scraped on the port it serves
    api_port = int(option(compose["services"]["api"]["command"], "--port"))
    assert ("api", api_port) in targets
    # and every worker serves metrics, to the compose network, on a port Prometheus scrapes
    for name, command in workers.items():
        assert option(command, "--metrics-host") == "0.0.0.0", name
        assert (name, int(option(command, "--metrics-port"))) in targets, f"{name} is not scraped"
        # without publishing it beyond the compose network
        assert "ports" not in compose["services"][name], name
    # and nothing else: each target is a service of the compose file
    assert {host for host, _ in targets} <= set(compose["services"])
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])


def test_prometheus_and_grafana_are_provisioned_and_kept_on_loopback() -> None:
    services = load_yaml(ROOT / "docker-compose.yml")["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]

    # Given what each mounts: the files in deploy/ exist and land where the service reads them
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "blaze.yml")["providers"][0]
    assert mounts["./deploy/grafana/blaze.json"] == f"{provider['options']['path']}/blaze.json"
    assert all((ROOT / host).exists() for host in mounts)

    # When the operator sets nothing, compose refuses to start Grafana (no default password)
    password = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    with pytest.raises(ValueError, match="BLAZE_GRAFANA_PASSWORD"):
        compose_value(password, {})
    assert compose_value(password, {"BLAZE_GRAFANA_PASSWORD": "s3cret"}) == "s3cret"
    # Then both are published on this host's loopback only
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
def test_promtool_accepts_the_prometheus_configuration() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
