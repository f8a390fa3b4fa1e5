"""A diffusion job's scheduler by name: in the engine (called directly) and refused over HTTP."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from blaze_jobs import cache
from blaze_jobs.client import BlazeClient
from blaze_jobs.engines.base import EngineRequest
from blaze_jobs.engines.diffusion import DiffusionEngine, DiffusionInput
from blaze_jobs.engines.diffusion_input import SCHEDULER_ALIASES, SCHEDULERS
from blaze_jobs.errors import RequestError
from blaze_jobs.settings import Settings
from tests.test_diffusion_engine import output, same_image

pytestmark = pytest.mark.timeout(120)

MODEL = "builtin:tiny-sd"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiffusionEngine]:
    engine = DiffusionEngine(model_dir=tmp_path_factory.mktemp("models"))
    yield engine
    engine.close()


def request(job_id: str, scheduler: str | None = None, **input: Any) -> EngineRequest:
    data: dict[str, Any] = {"prompt": "a lighthouse", "seed": 3, "num_inference_steps": 3, **input}
    if scheduler is not None:
        data["scheduler"] = scheduler
    return EngineRequest(job_id=job_id, model=MODEL, input=data)


def digest(result: dict[str, Any] | BaseException) -> str:
    (image,) = output(result)["images"]
    return hashlib.sha256(image.data).hexdigest()


def test_the_listed_schedulers_are_ones_the_model_takes(engine: DiffusionEngine) -> None:
    from diffusers.schedulers import KarrasDiffusionSchedulers

    # Given the built-in model, loaded as a worker loads it
    engine.prepare(MODEL)
    compatibles = {kind.__name__ for kind in engine._pipeline(MODEL).scheduler.compatibles}

    # Then every listed name is one of its compatible schedulers, and the ones left out are
    # those the comment on the list gives a reason for
    assert set(SCHEDULERS) <= compatibles == {member.name for member in KarrasDiffusionSchedulers}
    assert compatibles - set(SCHEDULERS) == {"DPMSolverSDEScheduler", "LMSDiscreteScheduler", "EDMEulerScheduler"}
    # and every short name means a listed one
    assert set(SCHEDULER_ALIASES.values()) == set(SCHEDULERS)


def test_a_named_scheduler_changes_the_image_and_repeats_it(engine: DiffusionEngine) -> None:
    # Given the model's own scheduler and Euler ancestral, which draws noise at every step
    default = digest(engine.run(request("default")))

    # When the same request names it, twice, and once by its short name in capitals
    named = [digest(engine.run(request(f"named-{n}", scheduler))) for n, scheduler in enumerate(("euler_a", "EULER_A"))]
    named.append(digest(engine.run(request("full", "EulerAncestralDiscreteScheduler"))))

    # Then it gives another image than the default, and the same one every time
    assert named[0] != default
    assert named == [named[0]] * 3


def test_a_batch_of_mixed_schedulers_runs_each_apart(engine: DiffusionEngine) -> None:
    # Given a batch holding the default, every listed scheduler, and a second DDIM job
    batch = [request("default"), *(request(name, name) for name in SCHEDULERS), request("ddim-2", "ddim", prompt="a boat")]

    # Then their batch keys keep the schedulers apart, and join a short name to its full one
    keys = [engine.batch_key(r) for r in batch]
    assert len(set(keys)) == len(SCHEDULERS) + 1
    assert keys[-1] == engine.batch_key(request("k", "DDIMScheduler"))
    assert keys[0] == engine.batch_key(request("k"))

    # When they run as one batch
    results = engine.run_batch(batch)

    # Then every job's image is the one it makes alone
    for job, result in zip(batch, results, strict=True):
        (alone,) = engine.run(job)["images"]
        assert same_image(output(result)["images"][0], alone), job.job_id


def test_the_loaded_pipeline_keeps_its_scheduler(engine: DiffusionEngine) -> None:
    # Given the loaded pipeline's scheduler and the default image
    pipe = engine._pipeline(MODEL)
    scheduler, config = pipe.scheduler, dict(pipe.scheduler.config)
    default = digest(engine.run(request("before")))

    # When jobs with other schedulers have run, alone and in one batch
    engine.run(request("ddim", "ddim"))
    engine.run_batch([request("heun", "heun"), request("unipc", "unipc")])

    # Then the loaded pipeline still holds the same scheduler with the same configuration,
    # and the next default job makes the same bytes as before
    assert pipe.scheduler is scheduler and dict(pipe.scheduler.config) == config
    assert digest(engine.run(request("after"))) == default


def test_the_engine_refuses_an_unknown_scheduler_as_the_requests_fault(engine: DiffusionEngine) -> None:
    (result,) = engine.run_batch([request("bad", "warp-drive")])

    assert isinstance(result, RequestError)
    assert "scheduler" in str(result) and "'warp-drive'" in str(result) and "DDIMScheduler" in str(result)


def test_the_scheduler_is_part_of_the_cache_key() -> None:
    # Given the input the API stores for a request (its validated model, nulls left out)
    def key(**input: Any) -> str:
        stored = DiffusionInput(prompt="a fox", seed=1, **input).model_dump(exclude_none=True)
        return cache.cache_key(engine="diffusion", model=MODEL, input=stored, tenant="t", settings=Settings())

    # Then a named scheduler has keys of its own, and a short name shares its full name's
    assert len({key(), key(scheduler="DDIMScheduler"), key(scheduler="EulerDiscreteScheduler")}) == 3
    assert key(scheduler="ddim") == key(scheduler="DDIMScheduler")


def test_the_api_states_the_schedulers_and_refuses_others(http: httpx.Client, client: BlazeClient) -> None:
    # Given the OpenAPI document: it lists the schedulers a job may name
    schema = http.get("/openapi.json").json()["components"]["schemas"]["DiffusionInput"]["properties"]["scheduler"]
    (named,) = [branch for branch in schema["anyOf"] if branch.get("type") == "string"]
    assert named["enum"] == list(SCHEDULERS)

    # When a job names one that is not there
    answer = http.post("/v1/jobs", json={"engine": "diffusion", "input": {"prompt": "a fox", "scheduler": "warp-drive"}})

    # Then it is a 422 problem naming the field and listing every allowed name
    assert answer.status_code == 422 and answer.headers["content-type"].startswith("application/problem+json")
    (error,) = answer.json()["errors"]
    assert error["field"] == "input.scheduler"
    assert all(name in error["message"] for name in SCHEDULERS)

    # And a short name is stored as the full one (so the cache and batch keys agree on it),
    # and runs on a real worker
    job = client.submit("diffusion", {"prompt": "a fox", "scheduler": "Euler", "seed": 5, "num_inference_steps": 2})
    assert job["input"]["scheduler"] == "EulerDiscreteScheduler"
    job = client.wait(job["id"], timeout=90)
    assert job["status"] == "succeeded", job["error"]
