"""Image jobs end to end: HTTP submit, a real diffusion worker, poll, download the artifact."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from blaze_jobs.client import BlazeClient

pytestmark = pytest.mark.timeout(180)


def test_an_image_job_yields_a_png_of_the_requested_size(client: BlazeClient) -> None:
    # Given a diffusion job at a size other than the model's default
    job = client.submit("diffusion", {"prompt": "a red fox", "width": 48, "height": 32, "seed": 7})
    assert job["status"] == "queued" and job["model"] == "builtin:tiny-sd"

    # When the worker has run it
    job = client.wait(job["id"], timeout=120)

    # Then the job succeeded with one PNG of that size, served at its URL
    assert job["status"] == "succeeded", job["error"]
    (image,) = job["output"]["images"]
    assert (image["width"], image["height"], image["seed"], image["content_type"]) == (48, 32, 7, "image/png")
    data = client.download(image["url"])
    assert hashlib.sha256(data).hexdigest() == image["sha256"]
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "PNG" and picture.size == (48, 32)
    # and its timeline and metrics are filled in
    assert job["attempts"] == 1 and job["metrics"]["batch_size"] == 1
    assert job["metrics"]["queue_time_s"] >= 0 and job["metrics"]["run_time_s"] > 0
    assert job["created_at"] <= job["started_at"] <= job["completed_at"]


def test_the_model_default_size_is_64_pixels(client: BlazeClient) -> None:
    job = client.wait(client.submit("diffusion", {"prompt": "a lighthouse", "num_inference_steps": 4})["id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    image = job["output"]["images"][0]
    assert (image["width"], image["height"]) == (64, 64)
    # A job without a seed gets one drawn for it, reported so it can be reproduced.
    assert isinstance(image["seed"], int)


def test_the_same_seed_gives_the_same_bytes(client: BlazeClient) -> None:
    # Given two identical requests with a seed, and one with another seed
    request = {"prompt": "a lighthouse at dusk", "seed": 1234, "num_inference_steps": 8}
    ids = [client.submit("diffusion", request)["id"] for _ in range(2)]
    ids.append(client.submit("diffusion", {**request, "seed": 1235})["id"])

    # When all have run
    jobs = [client.wait(job_id, timeout=120) for job_id in ids]

    # Then the same seed gave the same image, and another seed another image
    digests = [job["output"]["images"][0]["sha256"] for job in jobs]
    assert digests[0] == digests[1]
    assert digests[2] != digests[0]


def test_several_outputs_and_other_formats(client: BlazeClient) -> None:
    job = client.submit(
        "diffusion", {"prompt": "two foxes", "seed": 5, "num_outputs": 2, "output_format": "jpeg", "num_inference_steps": 4}
    )
    job = client.wait(job["id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    images = job["output"]["images"]
    assert [i["seed"] for i in images] == [5, 6]
    for image in images:
        response = client.http.get(image["url"])
        assert response.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(response.content)).format == "JPEG"


def test_an_echo_job_returns_its_input(client: BlazeClient) -> None:
    job = client.wait(client.submit("echo", {"greeting": "hello", "n": [1, 2]})["id"], timeout=30)
    assert job["status"] == "succeeded"
    assert job["output"] == {"greeting": "hello", "n": [1, 2], "sleep_ms": 0}


def test_an_echo_job_returns_any_json_it_was_given(client: BlazeClient) -> None:
    # Integers beyond 64 bits, floats, text outside ASCII: the job's JSON carries them all
    given = {"big": 10**30, "small": -(2**70), "ratio": 0.1, "text": "é 漢字 🦊", "nested": {"list": [None, True, {}]}}
    created = client.submit("echo", given)
    assert created["input"] == {**given, "sleep_ms": 0}
    job = client.wait(created["id"], timeout=30)
    assert job["status"] == "succeeded"
    assert job["output"] == {**given, "sleep_ms": 0}
