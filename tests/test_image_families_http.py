"""Diffusion families, input images and schedulers through a real API and a real diffusion
worker, on the built-in tiny SD, SDXL and SD 3 models: what a client sends over HTTP and
reads back as pixels.

Each test writes its own prompts: seeded requests are cached, and a repeat would be a hit.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from blaze_jobs.stack import Stack
from tests.conftest import ADMIN_TOKEN, delete_keys, start_api, unique, wait_for_workers, wait_until
from tests.test_image_to_image import data_uri, half_mask, picture

pytestmark = pytest.mark.timeout(240)

SERVED = "builtin:tiny-sdxl,builtin:tiny-sd3"


@pytest.fixture(scope="module")
def api(test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """An API serving the three built-in image models and one diffusion worker that batches
    up to 4 jobs, waiting up to 3 s for companions (jobs below arrive one request apart)."""
    prefix = f"blaze-test-{uuid.uuid4().hex[:8]}:"
    served = {"BLAZE_DIFFUSION_MODELS": SERVED, "BLAZE_MAX_LOADED_MODELS": "3"}
    env = {**test_env, "BLAZE_REDIS_PREFIX": prefix, **served}
    with Stack(env=env, log_dir=tmp_path_factory.mktemp("families-stack")) as stack:
        url = start_api(stack)
        stack.blaze("worker", "worker", "--engine", "diffusion", "--max-batch", "4", "--max-wait-ms", "3000")
        wait_for_workers(url, 1)
        with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            yield client
    delete_keys(prefix, redis_url=env["BLAZE_REDIS_URL"])


def submit(api: httpx.Client, model: str | None = None, **input: Any) -> str:
    body: dict[str, Any] = {"engine": "diffusion", "input": {"prompt": unique("a harbour"), "seed": 3, **input}}
    if model is not None:
        body["model"] = model
    answer = api.post("/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def finished(api: httpx.Client, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = wait_until(
        lambda: (found := api.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed", "canceled") and found,
        timeout=180,
        what=f"job {job_id} to end",
        interval=0.2,
    )
    assert job["status"] == "succeeded", job
    return job


def pixels_of(api: httpx.Client, job: dict[str, Any], index: int = 0) -> np.ndarray:
    answer = api.get(job["output"]["images"][index]["url"])
    assert answer.status_code == 200, answer.text
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(int)


def test_sdxl_and_sd3_models_make_images_of_their_own_family(api: httpx.Client) -> None:
    # When a client asks each served family for an image, naming the model
    jobs = {model: submit(api, model, num_inference_steps=3) for model in ("builtin:tiny-sdxl", "builtin:tiny-sd3")}

    # Then each ran on its own model and made a 64x64 image of its own
    images = {}
    for model, job_id in jobs.items():
        job = finished(api, job_id)
        assert job["model"] == model
        (image,) = job["output"]["images"]
        assert (image["width"], image["height"], image["content_type"]) == (64, 64, "image/png")
        images[model] = pixels_of(api, job)
    assert not np.array_equal(images["builtin:tiny-sdxl"], images["builtin:tiny-sd3"])

    # And the worker reports both loaded (at its next heartbeat)
    def both_loaded() -> bool:
        (worker,) = api.get("/v1/workers").json()["workers"]
        return {"builtin:tiny-sdxl", "builtin:tiny-sd3"} <= set(worker["models"])

    wait_until(both_loaded, timeout=30, what="the worker to report both models")


def test_strength_zero_gives_back_the_input_from_an_artifact_and_from_a_data_uri(api: httpx.Client) -> None:
    # Given an image an earlier job made, and a picture the client sends inline
    earlier = finished(api, submit(api, "builtin:tiny-sdxl", num_inference_steps=3))
    earlier_pixels = pixels_of(api, earlier)
    inline = picture(seed=5)

    # When image-to-image jobs take each at strength 0, and the artifact at strength 0.6
    from_artifact = submit(api, "builtin:tiny-sdxl", image=earlier["output"]["images"][0]["url"], strength=0)
    from_data = submit(api, image=data_uri(inline), strength=0)
    moved = submit(api, "builtin:tiny-sdxl", image=earlier["output"]["images"][0]["url"], strength=0.6, num_inference_steps=4)

    # Then strength 0 gave back each input's pixels, and 0.6 moved away from them
    assert np.array_equal(pixels_of(api, finished(api, from_artifact)), earlier_pixels)
    assert np.array_equal(pixels_of(api, finished(api, from_data)), np.asarray(inline).astype(int))
    changed = pixels_of(api, finished(api, moved))
    assert changed.shape == earlier_pixels.shape and not np.array_equal(changed, earlier_pixels)


@pytest.mark.parametrize("model", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
def test_inpainting_leaves_every_pixel_outside_the_mask_unchanged(api: httpx.Client, model: str) -> None:
    # Given a picture and a mask that repaints its right half
    source, mask = picture(seed=7), half_mask()

    # When an inpainting job runs over HTTP
    job = finished(api, submit(api, model, image=data_uri(source), mask=data_uri(mask), strength=1.0, num_inference_steps=4))

    # Then, measured pixel by pixel, the left half is the input's and the right half is new
    got, original = pixels_of(api, job), np.asarray(source).astype(int)
    outside = np.asarray(mask) == 0
    unchanged_outside = np.all(got[outside] == original[outside], axis=-1).mean()
    changed_inside = np.any(got[~outside] != original[~outside], axis=-1).mean()
    assert unchanged_outside == 1.0, f"{unchanged_outside:.4f} of the unmasked pixels kept"
    assert changed_inside > 0.9, f"only {changed_inside:.4f} of the masked pixels repainted"


def test_a_named_scheduler_changes_the_image_and_a_batch_never_mixes_schedulers(api: httpx.Client) -> None:
    # When four jobs arrive together, two on the model's own scheduler and two on Euler
    # ancestral, each pair with the seeds 1 and 2 (and a fifth, bypassing the cache, that
    # repeats the first Euler ancestral job)
    prompt = unique("a lighthouse")

    def job(seed: int, **extra: Any) -> dict[str, Any]:
        return {"prompt": prompt, "seed": seed, "num_inference_steps": 4, **extra}

    bodies = [job(1), job(2), job(1, scheduler="euler_a"), job(2, scheduler="euler_a")]
    ids = [submit(api, **body) for body in bodies]
    jobs = [finished(api, job_id) for job_id in ids]
    repeat = api.post("/v1/jobs", json={"engine": "diffusion", "input": bodies[2], "cache": "bypass"})
    assert repeat.status_code == 202, repeat.text
    repeated = finished(api, repeat.json()["id"])

    # Then the schedulers ran apart: no batch held more than its own pair
    assert all(1 <= j["metrics"]["batch_size"] <= 2 for j in jobs), [j["metrics"] for j in jobs]
    assert not repeated["metrics"]["cache_hit"]
    # and a named scheduler made other images than the model's own, from the same seeds
    default_1, default_2, euler_1, euler_2 = (pixels_of(api, j) for j in jobs)
    assert not np.array_equal(default_1, euler_1) and not np.array_equal(default_2, euler_2)
    # and the same image again when repeated (to a rounding step: batched CPU kernels sum in
    # another order than a solo run, see tests/test_diffusion_engine.py)
    assert int(np.abs(pixels_of(api, repeated) - euler_1).max()) <= 1


def test_a_refused_scheduler_and_an_input_the_family_does_not_take_answer_422(api: httpx.Client) -> None:
    def create(model: str | None = None, **input: Any) -> httpx.Response:
        body: dict[str, Any] = {"engine": "diffusion", "input": {"prompt": "a fox", **input}}
        if model is not None:
            body["model"] = model
        return api.post("/v1/jobs", json=body)

    # A scheduler no diffusion model takes, named on any model
    unknown = create(scheduler="warp-drive")
    assert unknown.status_code == 422 and unknown.headers["content-type"].startswith("application/problem+json")
    assert unknown.json()["errors"][0]["field"] == "input.scheduler"

    # A scheduler, on SD 3, which denoises only with the flow-matching scheduler it was trained for
    refused = create("builtin:tiny-sd3", scheduler="euler")
    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"] == [
        {"field": "input.scheduler", "message": "Stable Diffusion 3 models do not take scheduler"}
    ]

    # And the same request on a model that takes it is accepted
    assert create("builtin:tiny-sdxl", scheduler="euler", seed=int(uuid.uuid4().int % 2**31)).status_code == 202
