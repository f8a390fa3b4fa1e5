"""The result cache: a deterministic request (a seed given) is computed once; the next one
is answered from the cache, at creation (L2) or by the worker."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis

from blaze_jobs import cache
from blaze_jobs.artifacts import RedisArtifactStore, artifact_url
from blaze_jobs.client import BlazeClient
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings
from blaze_jobs.worker import run_job
from tests.test_breaker import queued_job, worker_contexts

pytestmark = pytest.mark.timeout(120)


def test_a_repeated_seeded_request_is_born_succeeded_from_the_cache(client: BlazeClient) -> None:
    # Given a seeded image job that has run
    request = {"prompt": f"a lighthouse {uuid.uuid4()}", "seed": 11, "num_inference_steps": 4}
    first = client.wait(client.submit("diffusion", request)["id"], timeout=90)
    assert first["status"] == "succeeded" and first["metrics"]["cache_hit"] is False

    # When the same request comes again
    again = client.submit("diffusion", request)

    # Then it is answered at once, already succeeded, with the same image and no worker
    assert again["status"] == "succeeded" and again["metrics"]["cache_hit"] is True
    assert again["attempts"] == 0 and again["worker"] is None
    assert again["output"]["images"][0]["sha256"] == first["output"]["images"][0]["sha256"]
    assert client.download(again["output"]["images"][0]["url"]) == client.download(first["output"]["images"][0]["url"])


def test_unseeded_and_bypassing_requests_are_computed(client: BlazeClient) -> None:
    marker = str(uuid.uuid4())
    # An unseeded request is never cached: it runs each time
    for _ in range(2):
        job = client.submit("echo", {"marker": marker})
        assert job["status"] == "queued"
        assert client.wait(job["id"], timeout=30)["metrics"]["cache_hit"] is False

    # A seeded one is cached, unless the client asks to bypass the cache
    seeded = {"marker": marker, "seed": 1}
    assert client.wait(client.submit("echo", seeded)["id"], timeout=30)["metrics"]["cache_hit"] is False
    assert client.submit("echo", seeded)["metrics"]["cache_hit"] is True
    bypass = client.submit("echo", seeded, cache="bypass")
    assert bypass["status"] == "queued"
    assert client.wait(bypass["id"], timeout=30)["metrics"]["cache_hit"] is False


def test_the_worker_answers_from_the_cache_when_the_result_came_in_meanwhile(client: BlazeClient) -> None:
    # Given two identical seeded jobs queued before either ran (the echo worker runs one at a time)
    request = {"marker": str(uuid.uuid4()), "seed": 5, "sleep_ms": 300}
    ids = [client.submit("echo", request)["id"] for _ in range(2)]

    # When both have ended
    jobs = [client.wait(i, timeout=30) for i in ids]

    # Then the second was taken by the worker but not computed: the worker found the result
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
    assert [j["metrics"]["cache_hit"] for j in jobs] == [False, True]
    assert jobs[1]["attempts"] == 1 and jobs[1]["metrics"]["run_time_s"] < 0.3
    assert jobs[0]["output"] == jobs[1]["output"]


def cached_output_with_artifacts(settings: Settings, engine: str, input: dict[str, Any], *, ttl_s: int) -> list[str]:
    """Store, as a worker would, a cached output for this request that points at two
    artifacts (an image, and a file outside ``images``) expiring in ``ttl_s``; their keys."""
    client = redis.Redis.from_url(settings.redis_url)
    artifacts = RedisArtifactStore(client, prefix=settings.redis_prefix, ttl_s=ttl_s)
    image, mask = artifacts.put(uuid.uuid4().bytes, "png"), artifacts.put(uuid.uuid4().bytes, "json")
    output = {"images": [{"url": artifact_url(image)}], "extra": {"mask": {"url": artifact_url(mask)}}}
    model = settings.default_model(engine)
    key = cache.cache_key(engine=engine, model=model, input=input, tenant=settings.default_tenant, settings=settings)
    with client.pipeline() as pipe:
        cache.queue_store(pipe, cache.CacheKeys(settings.redis_prefix), key, json.dumps(output), settings=settings)
        pipe.execute()
    return [f"{settings.redis_prefix}artifact:{k}" for k in (image, mask)]


def owners(settings: Settings, artifact: str) -> str:
    """The owners set of the artifact stored at Redis key ``artifact``."""
    return Keys(settings.redis_prefix).artifact_owners(artifact.rsplit(":", 1)[1])


def test_a_hit_at_creation_renews_every_artifact_the_output_points_at(client: BlazeClient, settings: Settings) -> None:
    # Given a cached output whose artifacts (an image and another file) expire in a minute
    request = {"marker": str(uuid.uuid4()), "seed": 3}
    keys = cached_output_with_artifacts(settings, "echo", request, ttl_s=60)
    # When the same request is made
    job = client.submit("echo", request)
    # Then the job is born from the cache and every artifact lives as long as the job, owned
    # by the job's tenant
    assert job["metrics"]["cache_hit"] is True
    with redis.Redis.from_url(settings.redis_url) as r:
        assert [r.ttl(k) > 3600 for k in keys] == [True, True]
        assert [r.smembers(owners(settings, k)) for k in keys] == [{settings.default_tenant.encode()}] * 2


def test_a_hit_in_the_worker_renews_every_artifact_the_output_points_at() -> None:
    with worker_contexts("worker-a") as (worker,):
        # Given a queued seeded job whose output is in the cache, pointing at artifacts that
        # expire in a minute (the API missed it: the output came in after the job was queued)
        request = {"marker": str(uuid.uuid4()), "seed": 4}
        keys = cached_output_with_artifacts(worker.settings, "echo", request, ttl_s=60)
        job_id = queued_job(worker, request)
        # When the worker runs it
        assert run_job(job_id, engine="echo", context=worker) == "succeeded"
        # Then it answered from the cache and every artifact lives as long as the job, owned
        # by the job's tenant
        assert worker.store.get(job_id)["cache_hit"] == "1"
        assert [worker.redis.ttl(k) > 3600 for k in keys] == [True, True]
        tenant = worker.settings.default_tenant.encode()
        assert [worker.redis.smembers(owners(worker.settings, k)) for k in keys] == [{tenant}] * 2
