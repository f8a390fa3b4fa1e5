"""Tenants are isolated on the job path: each tenant lists, reads, waits on, streams and
cancels only its own jobs, and another tenant's job answers 404 on every route, exactly as a
job that does not exist, and stays as it was. A tenant's quota counts its own queued and
running jobs, in the step that stores a job. (The quota's and the queue bound's answers over
HTTP: test_admission.py.)"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

from blaze_jobs.api_keys import create_key
from blaze_jobs.errors import QueueFull, QuotaExceeded
from blaze_jobs.jobs import JobStatus, new_record
from blaze_jobs.reaper import Reaper
from blaze_jobs.records import score_of, text
from blaze_jobs.settings import Settings
from blaze_jobs.store import AsyncJobStore, JobStore
from tests.conftest import AUTH, REDIS_URL, own_prefix, wait_until

pytestmark = pytest.mark.timeout(180)


@dataclass(frozen=True)
class Tenant:
    """A tenant of this run and an HTTP client sending a key of its own."""

    name: str
    http: httpx.Client


@pytest.fixture(scope="module")
def tenants(stack: dict[str, Any], settings: Settings) -> Iterator[tuple[Tenant, Tenant]]:
    """Two tenants of this run, acme and globex, each with a key of its own."""
    found: list[Tenant] = []
    with redis.Redis.from_url(settings.redis_url) as client:
        for name in ("acme", "globex"):
            unique = f"{name}-{uuid.uuid4().hex[:6]}"
            secret, _ = create_key(client, settings, tenant=unique, name="ci")
            headers = {"Authorization": f"Bearer {secret}"}
            found.append(Tenant(unique, httpx.Client(base_url=stack["api_url"], timeout=30, headers=headers)))
    acme, globex = found
    yield acme, globex
    for each in found:
        each.http.close()


def submit(http: httpx.Client, **input: Any) -> dict[str, Any]:
    """A new echo job of the client's tenant (its input unique: no cache hit across tests)."""
    answer = http.post("/v1/jobs", json={"engine": "echo", "input": {"marker": uuid.uuid4().hex, **input}})
    assert answer.status_code == 202, answer.text
    job: dict[str, Any] = answer.json()
    return job


def listed(http: httpx.Client, **params: str) -> set[str]:
    answer = http.get("/v1/jobs", params={"limit": "100", **params})
    assert answer.status_code == 200, answer.text
    return {job["id"] for job in answer.json()["jobs"]}


def status_of(http: httpx.Client, job_id: str) -> str:
    status: str = http.get(f"/v1/jobs/{job_id}").json()["status"]
    return status


def events_of(http: httpx.Client, job_id: str) -> list[tuple[str, Any]]:
    """The job's server-sent events, (type, data), until its job.completed."""
    found: list[tuple[str, Any]] = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as stream:
        assert stream.status_code == 200, stream.read()
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind:
                found.append((kind, json.loads(line.removeprefix("data: "))))
                if kind == "job.completed":
                    return found
    return found


def test_each_tenant_lists_only_its_own_jobs_with_and_without_filters(tenants: tuple[Tenant, Tenant], http: httpx.Client) -> None:
    # Given two jobs of acme and one of globex, ended
    acme, globex = (tenant.http for tenant in tenants)
    mine = {submit(acme)["id"], submit(acme)["id"]}
    theirs = {submit(globex)["id"]}
    for session, ids in ((acme, mine), (globex, theirs)):
        for job_id in ids:
            assert session.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"] == "succeeded"

    # When each lists its jobs, Then it sees its own and none of the other's, whatever the filter
    for session, own in ((acme, mine), (globex, theirs)):
        assert listed(session) == own
        assert listed(session, status="succeeded") == own
        assert listed(session, engine="echo") == own
        assert listed(session, status="queued") == set()
        assert listed(session, engine="llm") == set()
    # And a page at a time, too: one job a page, each once
    first = acme.get("/v1/jobs", params={"limit": 1}).json()
    second = acme.get("/v1/jobs", params={"limit": 1, "cursor": first["next_cursor"]}).json()
    assert {first["jobs"][0]["id"], second["jobs"][0]["id"]} == mine and second["next_cursor"] is None
    # And the default tenant's newest jobs (the admin token's) hold neither tenant's
    assert not (mine | theirs) & {job["id"] for job in http.get("/v1/jobs", params={"limit": 100}).json()["jobs"]}


def test_another_tenants_job_answers_404_on_every_route_as_a_missing_one_and_keeps_running(
    tenants: tuple[Tenant, Tenant],
) -> None:
    # Given a job of acme's that runs for a few seconds, running
    acme, globex = (tenant.http for tenant in tenants)
    job_id = submit(acme, sleep_ms=3000)["id"]
    wait_until(lambda: status_of(acme, job_id) == "running", timeout=60, what="acme's job running")

    # When globex asks for it on every route a job has
    attempts = {
        "get": lambda job: globex.get(f"/v1/jobs/{job}"),
        "wait": lambda job: globex.get(f"/v1/jobs/{job}", params={"wait": 1}),
        "events": lambda job: globex.get(f"/v1/jobs/{job}/events"),
        "cancel": lambda job: globex.post(f"/v1/jobs/{job}/cancel"),
        "deliveries": lambda job: globex.get(f"/v1/jobs/{job}/deliveries"),
        "redeliver": lambda job: globex.post(f"/v1/jobs/{job}/deliveries/1-0/redeliver"),
    }
    missing = str(uuid.uuid4())
    for route, attempt in attempts.items():
        answer, unknown = attempt(job_id), attempt(missing)

        # Then each is a 404 problem, the very one a job that does not exist gets
        assert answer.status_code == 404, (route, answer.status_code, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json"), route
        problem, absent = answer.json(), unknown.json()
        assert (problem["type"], problem["title"]) == (absent["type"], absent["title"]), route
        assert problem["detail"] == absent["detail"].replace(missing, job_id), route

    # And acme's job ran on, uncanceled, to its end, which acme streams as its own events
    events = events_of(acme, job_id)
    assert events[0][0] == "job" and events[-1][0] == "job.completed"
    assert events[-1][1]["status"] == "succeeded"
    job = acme.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["error"]) == ("succeeded", None)


def test_a_tenant_cancels_its_own_job_and_the_cancel_is_audited(tenants: tuple[Tenant, Tenant], http: httpx.Client) -> None:
    # Given a long job of acme's
    acme, globex = (tenant.http for tenant in tenants)
    job_id = submit(acme, sleep_ms=60_000)["id"]
    wait_until(lambda: status_of(acme, job_id) == "running", timeout=60, what="acme's job running")

    # When globex cancels it, Then that is a 404 and the job runs on
    assert globex.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    assert status_of(acme, job_id) == "running"

    # When acme cancels it, Then it is canceled, and stays so
    canceled = acme.post(f"/v1/jobs/{job_id}/cancel")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    assert acme.get(f"/v1/jobs/{job_id}", params={"wait": 1}).json()["status"] == "canceled"

    # And the audit trail (an admin's to read) holds acme's cancel, once, and not globex's try
    entries = http.get("/v1/admin/audit", params={"limit": 1000}, headers=AUTH).json()["entries"]
    cancels = [e for e in entries if e["action"] == "job.cancel" and e["target"] == job_id]
    assert [(e["tenant"], e["who"]["tenant"]) for e in cancels] == [(tenants[0].name, tenants[0].name)]
    assert cancels[0]["address"]


# --- the store: quota, queue bound, the live indexes' trim ----------------------------------


@pytest.fixture()
def store() -> Iterator[JobStore]:
    """A job store under a prefix of its own (no stack), its echo queue bounded at 3."""
    with own_prefix("tenants") as prefix, redis.Redis.from_url(REDIS_URL) as client:
        yield JobStore(client, Settings(redis_url=REDIS_URL, redis_prefix=prefix, queue_max=3))


def create(store: JobStore, tenant: str, *, max_jobs: int = 0) -> str:
    """What the API's create does for a key of ``tenant`` allowed ``max_jobs``."""
    job_id = str(uuid.uuid4())
    record = new_record(job_id=job_id, tenant=tenant, engine="echo", model="builtin:echo", input={}, created_at=time.time())

    async def run() -> None:
        async with redis.asyncio.Redis.from_url(REDIS_URL) as client:
            await AsyncJobStore(client, store.settings).create_queued(
                record, queue=store.keys.queue("echo"), message=job_id, max_jobs=max_jobs
            )

    asyncio.run(run())
    return job_id


def members(store: JobStore, index: str) -> list[str]:
    return [text(member) for member in store.redis.zrange(index, 0, -1)]


def test_a_quota_counts_the_tenants_queued_and_running_jobs_and_refuses_before_storing(store: JobStore) -> None:
    # Given acme with one job running and one queued, and globex with one queued
    running, queued = create(store, "acme", max_jobs=2), create(store, "acme", max_jobs=2)
    store.take(running, tenant="acme", worker="w1", lease_ms=30_000)
    create(store, "globex")
    store.redis.delete(store.keys.queue("echo"))  # (the queue's bound is the next test's)

    # When acme, allowed 2, asks for a third
    with pytest.raises(QuotaExceeded) as refused:
        create(store, "acme", max_jobs=2)

    # Then it is refused with acme's count and limit, and nothing of it is stored or queued
    assert (refused.value.tenant, refused.value.count, refused.value.limit) == ("acme", 2, 2)
    assert store.redis.zcard(store.keys.tenant_all("acme")) == 2
    assert store.redis.llen(store.keys.queue("echo")) == 0
    assert len(list(store.redis.scan_iter(match=f"{store.keys.job('')}*"))) == 3

    # When its running job ends, Then acme may have another
    store.transition(running, tenant="acme", allowed=(JobStatus.running,), to=JobStatus.succeeded)
    create(store, "acme", max_jobs=2)

    # And entries left behind by acme's jobs that expired unrun do not count against it
    expired = score_of(time.time() - store.settings.job_ttl_s - 60)
    store.redis.zadd(store.keys.tenant_status("acme", "queued"), {"expired-1": expired, "expired-2": expired})
    store.redis.delete(store.keys.queue("echo"))
    create(store, "acme", max_jobs=3)
    assert store.redis.zscore(store.keys.tenant_status("acme", "queued"), "expired-1") is None
    with pytest.raises(QuotaExceeded):
        create(store, "acme", max_jobs=3)
    assert queued in members(store, store.keys.tenant_status("acme", "queued"))


def test_a_full_engine_queue_refuses_a_job_before_storing_it(store: JobStore) -> None:
    # Given the echo queue at its bound of 3 messages
    for _ in range(3):
        create(store, "acme")

    # When a fourth job is asked for, Then the queue is full, and the job not stored
    with pytest.raises(QueueFull) as refused:
        create(store, "globex")
    assert (refused.value.engine, refused.value.length, refused.value.limit) == ("echo", 3, 3)
    assert store.redis.zcard(store.keys.tenant_all("globex")) == 0
    assert store.redis.zcard(store.keys.status("queued")) == 3


def test_the_reaper_trims_entries_of_expired_jobs_from_the_live_indexes(store: JobStore) -> None:
    # Given a live job, and entries left by jobs that expired queued and running
    live = create(store, "acme")
    expired = score_of(time.time() - store.settings.job_ttl_s - 60)
    store.redis.zadd(store.keys.status("queued"), {"gone-queued": expired})
    store.redis.zadd(store.keys.status("running"), {"gone-running": expired})

    # When the reaper trims, Then the stale entries are gone and the live job's stays
    assert Reaper(store=store, settings=store.settings, name="w1").trim() == 2
    assert members(store, store.keys.status("queued")) == [live]
    assert store.redis.zcard(store.keys.status("running")) == 0


def test_one_reaper_trim_drops_a_tenants_stale_index_entries_though_nobody_lists(store: JobStore) -> None:
    # Given acme (a key of its own) with a job queued and one that ended, and entries left in
    # its all, echo and succeeded indexes by jobs that expired; the same in the default
    # tenant's (no key of its own: the admin token's), and nobody ever listing either
    create_key(store.redis, store.settings, tenant="acme", name="ci")
    queued, ended = create(store, "acme"), create(store, "acme")
    store.take(ended, tenant="acme", worker="w1", lease_ms=30_000)
    store.transition(ended, tenant="acme", allowed=(JobStatus.running,), to=JobStatus.succeeded)
    expired = score_of(time.time() - store.settings.job_ttl_s - 60)
    default = store.settings.default_tenant
    stale = [
        index
        for tenant in ("acme", default)
        for index in (
            store.keys.tenant_all(tenant),
            store.keys.tenant_engine(tenant, "echo"),
            store.keys.tenant_status(tenant, JobStatus.succeeded.value),
        )
    ]
    for index in stale:
        store.redis.zadd(index, {"gone": expired})

    # When the reaper makes one trim pass
    removed = Reaper(store=store, settings=store.settings, name="w1").trim()

    # Then every stale entry is gone, and acme's own jobs keep theirs
    assert removed == len(stale)
    assert all(store.redis.zscore(index, "gone") is None for index in stale)
    assert sorted(members(store, store.keys.tenant_all("acme"))) == sorted([queued, ended])
    assert sorted(members(store, store.keys.tenant_engine("acme", "echo"))) == sorted([queued, ended])
    assert members(store, store.keys.tenant_status("acme", JobStatus.succeeded.value)) == [ended]
    assert members(store, store.keys.tenant_status("acme", JobStatus.queued.value)) == [queued]
