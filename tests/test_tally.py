"""The API's tally of per-request counts: what it keeps is written to prometheus-client's
children only when flushed, and then gives exactly the samples recording them directly gives."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from blaze_jobs.api.metrics import Tally
from blaze_jobs.metrics import REQUEST_SECONDS

pytestmark = pytest.mark.timeout(30)

#: Below the first bound, on bounds, between them, above the last: every bucket's edge case.
SECONDS = [0.0, 0.0004, 0.001, 0.0011, 0.0025, 0.7, 1.0, 29.9, 300.0, 300.5, 1e6]


def pair(name: str) -> tuple[CollectorRegistry, Histogram, Counter]:
    registry = CollectorRegistry()
    seconds = Histogram(f"{name}_seconds", "Times.", ["route"], buckets=REQUEST_SECONDS, registry=registry)
    counted = Counter(f"{name}_requests", "Requests.", ["route"], registry=registry)
    return registry, seconds, counted


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_a_flushed_tally_gives_the_samples_direct_recording_gives() -> None:
    # Given the same observations and counts recorded directly and through a tally
    direct, direct_seconds, direct_counted = pair("direct")
    tallied, tallied_seconds, tallied_counted = pair("tallied")
    tally = Tally()
    for route in ("/v1/jobs", "/v1/jobs/{job_id}"):
        for value in SECONDS:
            direct_seconds.labels(route).observe(value)
            direct_counted.labels(route).inc()
            tally.observe(tallied_seconds.labels(route), value)
            tally.inc(tallied_counted.labels(route))
    direct_counted.labels("/v1/jobs").inc(5)
    tally.inc(tallied_counted.labels("/v1/jobs"), 5)

    # Then nothing shows before a flush
    assert sum(v for (name, _), v in samples(tallied).items() if name.endswith("_count")) == 0
    # When the tally is flushed (twice: the second has nothing left to add)
    tally.flush()
    tally.flush()
    # Then every sample, bucket by bucket, is what direct recording gave
    renamed = {(name.replace("tallied", "direct"), labels): v for (name, labels), v in samples(tallied).items()}
    assert renamed == samples(direct)
    assert renamed[("direct_requests_total", (("route", "/v1/jobs"),))] == len(SECONDS) + 5


def test_flushing_every_interval_writes_as_it_goes_and_once_more_when_stopped() -> None:
    _, _, counted = pair("flushed")
    tally = Tally()
    child = counted.labels("/v1/jobs")

    async def run() -> tuple[float, float]:
        flushing = asyncio.create_task(tally.flush_every(0.01))
        tally.inc(child)
        for _ in range(500):  # at most 5 s, on a busy machine
            await asyncio.sleep(0.01)
            if child._value.get() == 1:
                break
        seen = child._value.get()
        tally.inc(child, 2)
        flushing.cancel()
        await asyncio.gather(flushing, return_exceptions=True)
        return seen, child._value.get()

    # When a count is kept while the tally flushes every 10 ms, and another just before it stops
    seen, last = asyncio.run(run())
    # Then the first was written while it ran, and the last when it stopped
    assert (seen, last) == (1, 3)
