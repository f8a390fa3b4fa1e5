"""Reading a process's Prometheus metrics in tests: one scrape, then sums over its samples."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(url: str, **headers: str) -> Samples:
    """One scrape of ``url`` (a ``/metrics`` address), on a connection of its own (so uvicorn
    may hand it to any of its processes), by sample name and labels."""
    answer = httpx.get(url, timeout=10, headers=headers)
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none has them)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in found.items() if n == name and wanted <= have)
