"""Image to image and inpainting in the diffusion engine, called directly on the built-in tiny model."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blaze_jobs.engines.base import EngineRequest
from blaze_jobs.engines.diffusion import DiffusionEngine
from tests.test_diffusion_engine import output, pixels, same_image

pytestmark = pytest.mark.timeout(120)

MODEL = "builtin:tiny-sd"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiffusionEngine]:
    engine = DiffusionEngine(model_dir=tmp_path_factory.mktemp("models"))
    yield engine
    engine.close()


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def picture(seed: int = 0) -> Image.Image:
    # A smooth gradient with a little seeded texture: any change to it shows.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    array = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1) + rng.integers(0, 16, (64, 64, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")


def half_mask() -> Image.Image:
    # The right half repaints (255), the left half stays.
    array = np.zeros((64, 64), dtype=np.uint8)
    array[:, 32:] = 255
    return Image.fromarray(array, "L")


def request(job_id: str, **input: Any) -> EngineRequest:
    data: dict[str, Any] = {"prompt": "a harbour at dusk", "seed": 4, "num_inference_steps": 4, **input}
    return EngineRequest(job_id=job_id, model=MODEL, input=data)


def test_strength_zero_gives_back_the_input(engine: DiffusionEngine) -> None:
    # Given an input image, When a job asks for strength 0
    source = picture()
    (image,) = output(engine.run_batch([request("zero", image=data_uri(source), strength=0.0)])[0])["images"]

    # Then no step changes it: every pixel is the input's
    assert (image.meta["width"], image.meta["height"]) == (64, 64)
    assert np.array_equal(pixels(image), np.asarray(source).astype(int))


def test_strength_half_changes_the_image_and_repeats_it(engine: DiffusionEngine) -> None:
    source = data_uri(picture())
    steps: list[int] = []

    # When the same job runs twice at strength 0.5, once reporting its progress
    job = request("half", image=source, strength=0.5)
    job.on_progress = lambda step, total: steps.append(total)
    (first,) = engine.run(job)["images"]
    (again,) = engine.run(request("half-again", image=source, strength=0.5))["images"]

    # Then it differs from the input, is the same both times, and ran half of its 4 steps
    assert not np.array_equal(pixels(first), np.asarray(picture()).astype(int))
    assert first.data == again.data
    assert steps == [2, 2]


def test_inpainting_keeps_every_pixel_outside_the_mask(engine: DiffusionEngine) -> None:
    source, mask = picture(), half_mask()

    (image,) = engine.run(request("fill", image=data_uri(source), mask=data_uri(mask), strength=1.0))["images"]

    # Then the left half is exactly the input's, and the right half was repainted
    got, original = pixels(image), np.asarray(source).astype(int)
    outside = np.asarray(mask) == 0
    assert int(outside.sum()) == 64 * 32
    assert np.array_equal(got[outside], original[outside])
    changed = np.any(got[~outside] != original[~outside], axis=-1)
    assert changed.mean() > 0.9


def test_a_batch_of_image_jobs_gives_each_what_it_gets_alone(engine: DiffusionEngine) -> None:
    # Given three image-to-image jobs of different images, prompts and seeds, one of two images
    batch = [
        request("a", image=data_uri(picture(1)), strength=0.75, seed=1),
        request("b", image=data_uri(picture(2)), strength=0.75, seed=2, prompt="a lighthouse", num_outputs=2),
        request("c", image=data_uri(picture(3)), strength=0.75, seed=3, negative_prompt="fog"),
    ]
    assert len({engine.batch_key(job) for job in batch}) == 1

    # When they run as one batch
    results = engine.run_batch(batch)

    # Then each job's images are the ones it makes alone
    for job, result in zip(batch, results, strict=True):
        alone = engine.run(EngineRequest(job_id="solo", model=MODEL, input=job.input))["images"]
        images = output(result)["images"]
        assert len(images) == len(alone)
        assert all(same_image(mine, solo) for mine, solo in zip(images, alone, strict=True)), job.job_id


def test_the_derived_pipelines_share_the_loaded_weights(engine: DiffusionEngine) -> None:
    # Given the loaded model, after image jobs of both kinds ran
    engine.run(request("i2i", image=data_uri(picture()), strength=0.5))
    engine.run(request("fill", image=data_uri(picture()), mask=data_uri(half_mask())))
    loaded = engine._load(MODEL)

    # Then each derived pipeline was built once and holds the loaded UNet, VAE and text encoder
    assert set(loaded.derived) == {"img2img", "inpaint"}
    for derived in loaded.derived.values():
        assert derived.unet is loaded.pipe.unet and derived.vae is loaded.pipe.vae
        assert derived.text_encoder is loaded.pipe.text_encoder
    before = dict(loaded.derived)
    engine.run(request("i2i-2", image=data_uri(picture()), strength=0.5))
    assert all(engine._load(MODEL).derived[task] is pipe for task, pipe in before.items())
