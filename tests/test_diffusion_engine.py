"""The diffusion engine on the built-in tiny model, called directly (no Redis, no Celery)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blaze_jobs.builtin_models import builtin_path
from blaze_jobs.engines.base import Artifact, EngineRequest
from blaze_jobs.engines.diffusion import DiffusionEngine
from blaze_jobs.errors import JobCanceled, RequestError, WorkerFault

MODEL = "builtin:tiny-sd"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[DiffusionEngine]:
    engine = DiffusionEngine(model_dir=model_dir)
    yield engine
    engine.close()


def request(job_id: str, *, model: str = MODEL, **input: object) -> EngineRequest:
    return EngineRequest(job_id=job_id, model=model, input={"num_inference_steps": 4, **input})


def output(result: dict[str, Any] | BaseException) -> dict[str, Any]:
    """A batch member's output; its error, raised, if it failed."""
    if isinstance(result, BaseException):
        raise result
    return result


def pixels(artifact: Artifact) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(artifact.data))).astype(int)


def same_image(a: Artifact, b: Artifact) -> bool:
    # Batched CPU kernels sum in another order than solo ones: the float images agree to
    # about 2e-6, so after rounding to 8 bits a rare channel value (well under 0.1% of
    # them) may differ by one. Equal bytes would be the stronger claim, and it does not hold.
    return a.meta == b.meta and int(np.abs(pixels(a) - pixels(b)).max()) <= 1


@pytest.mark.timeout(300)
def test_builds_the_builtin_model_and_makes_a_64px_png(engine: DiffusionEngine, model_dir: Path) -> None:
    # Given a fresh model dir, When a request names no size, seed or format
    output = engine.run(EngineRequest(job_id="j1", model=MODEL, input={"prompt": "a red fox"}))

    # Then the tiny model was built and loaded, and the image is the model's default 64x64 PNG
    assert (model_dir / "tiny-sd" / "model_index.json").exists()
    assert engine.loaded_models() == [MODEL]
    (image,) = output["images"]
    assert (image.content_type, image.extension) == ("image/png", "png")
    opened = Image.open(io.BytesIO(image.data))
    assert (opened.format, opened.size) == ("PNG", (64, 64))
    assert image.meta["width"] == image.meta["height"] == 64
    assert 0 <= image.meta["seed"] < 2**32
    assert engine.batch_key(request("k", prompt="x")) == (MODEL, 64, 64, 4, 7.5)


@pytest.mark.timeout(120)
def test_width_and_height_override_the_default(engine: DiffusionEngine) -> None:
    (image,) = engine.run(request("j", prompt="tall", width=32, height=48))["images"]

    assert Image.open(io.BytesIO(image.data)).size == (32, 48)
    assert (image.meta["width"], image.meta["height"]) == (32, 48)


@pytest.mark.timeout(120)
def test_same_seed_gives_the_same_bytes(engine: DiffusionEngine) -> None:
    def sha(seed: int) -> str:
        (image,) = engine.run(request("j", prompt="a lighthouse", seed=seed))["images"]
        return hashlib.sha256(image.data).hexdigest()

    assert sha(7) == sha(7)
    assert sha(7) != sha(8)


@pytest.mark.timeout(120)
def test_a_batch_gives_each_request_what_it_gets_alone(engine: DiffusionEngine) -> None:
    # Given three different requests, one with a negative prompt
    inputs: list[dict[str, Any]] = [
        {"prompt": "a cat", "seed": 1},
        {"prompt": "a dog on the beach", "seed": 2, "negative_prompt": "blurry"},
        {"prompt": "an owl", "seed": 3, "guidance_scale": 7.5},
    ]
    events: list[tuple[int, int]] = []

    def record(n: int) -> Callable[[int, int], None]:
        return lambda step, total: events.append((n, step))

    batch = [
        EngineRequest(
            job_id=str(n),
            model=MODEL,
            input={"num_inference_steps": 4, **data},
            on_progress=record(n),
        )
        for n, data in enumerate(inputs)
    ]

    # When they run as one batch
    assert len({engine.batch_key(r) for r in batch}) == 1
    results = engine.run_batch(batch)

    # Then they went through one pipeline call together (their steps interleave)
    assert events[:3] == [(0, 1), (1, 1), (2, 1)] and len(events) == 12
    # And each image matches the one the request makes alone
    for data, result in zip(inputs, results, strict=True):
        (alone,) = engine.run(request("solo", **data))["images"]
        assert same_image(output(result)["images"][0], alone)


@pytest.mark.timeout(120)
def test_num_outputs_gives_consecutive_seeds(engine: DiffusionEngine) -> None:
    first, second = engine.run(request("j", prompt="a boat", seed=40, num_outputs=2))["images"]

    assert (first.meta["seed"], second.meta["seed"]) == (40, 41)
    (alone,) = engine.run(request("j", prompt="a boat", seed=41))["images"]
    assert same_image(second, alone)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("fmt", "content_type", "pil_format"), [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")])
def test_other_output_formats(engine: DiffusionEngine, fmt: str, content_type: str, pil_format: str) -> None:
    (image,) = engine.run(request("j", prompt="a tree", seed=5, output_format=fmt))["images"]

    assert (image.content_type, image.extension) == (content_type, fmt)
    assert Image.open(io.BytesIO(image.data)).format == pil_format
    (again,) = engine.run(request("j", prompt="a tree", seed=5, output_format=fmt))["images"]
    assert again.data == image.data


@pytest.mark.timeout(120)
def test_should_stop_interrupts_the_run(engine: DiffusionEngine) -> None:
    # Given a 20-step job that asks to stop after its third step
    steps: list[int] = []
    job = EngineRequest(
        job_id="stopper",
        model=MODEL,
        input={"prompt": "a storm", "num_inference_steps": 20},
        should_stop=lambda: len(steps) >= 3,
        on_progress=lambda step, total: steps.append(step),
    )

    # When it runs, Then it ends canceled long before its last step
    (result,) = engine.run_batch([job])
    assert isinstance(result, JobCanceled)
    assert steps == [1, 2, 3]


@pytest.mark.timeout(120)
def test_a_stopping_member_does_not_stop_its_batch(engine: DiffusionEngine) -> None:
    steps: list[int] = []
    stopper = EngineRequest(
        job_id="stopper",
        model=MODEL,
        input={"prompt": "a storm", "num_inference_steps": 4},
        should_stop=lambda: len(steps) >= 2,
        on_progress=lambda step, total: steps.append(step),
    )
    queued_then_canceled = EngineRequest(
        job_id="gone", model=MODEL, input={"prompt": "x", "num_inference_steps": 4}, should_stop=lambda: True
    )
    keeper_steps: list[int] = []
    keeper = request("keeper", prompt="calm sea", seed=9)
    keeper.on_progress = lambda step, total: keeper_steps.append(step)

    stopped, canceled, kept = engine.run_batch([stopper, queued_then_canceled, keeper])

    assert isinstance(stopped, JobCanceled) and isinstance(canceled, JobCanceled)
    assert (steps, keeper_steps) == ([1, 2], [1, 2, 3, 4])  # the batch ran on for the keeper
    (alone,) = engine.run(request("keeper", prompt="calm sea", seed=9))["images"]
    assert same_image(output(kept)["images"][0], alone)


@pytest.mark.timeout(120)
def test_a_bad_member_fails_only_itself(engine: DiffusionEngine) -> None:
    good, bad, also_good = engine.run_batch(
        [request("a", prompt="one", seed=1), request("b", prompt="two", width=30), request("c", prompt="three")]
    )

    assert isinstance(bad, RequestError) and "width" in str(bad)
    assert len(output(good)["images"]) == len(output(also_good)["images"]) == 1


@pytest.mark.timeout(120)
def test_a_member_failing_mid_batch_is_retried_alone(engine: DiffusionEngine) -> None:
    # Given a batch where one member's hook fails during the pipeline call, once as a
    # device would (out of memory) and once with an ordinary error
    def failing(message: str, kind: type[Exception]) -> EngineRequest:
        def on_progress(step: int, total: int) -> None:
            raise kind(message)

        return EngineRequest(job_id="f", model=MODEL, input={"prompt": "p", "num_inference_steps": 4}, on_progress=on_progress)

    results = engine.run_batch(
        [request("a", prompt="one"), failing("CUDA out of memory", RuntimeError), request("b", prompt="two")]
    )
    # Then the batch is split until the culprit stands alone, and only it fails
    assert isinstance(results[1], WorkerFault) and "out of memory" in str(results[1])
    assert all("images" in output(r) for r in (results[0], results[2]))

    # An ordinary error on the device is the worker's too, whatever its type (the request
    # was read and checked before); still, only its job fails
    results = engine.run_batch([failing("bad value", ValueError), request("a", prompt="one")])
    assert isinstance(results[0], WorkerFault) and "bad value" in str(results[0]) and "images" in output(results[1])


@pytest.mark.timeout(180)
def test_models_load_lazily_and_the_least_recent_is_evicted(model_dir: Path) -> None:
    # Given an engine that keeps one model, and the built tiny model also named by its path
    engine = DiffusionEngine(model_dir=model_dir, max_loaded_models=1)
    by_path = str(model_dir / "tiny-sd")
    assert engine.loaded_models() == []

    engine.run(request("a", prompt="x"))
    engine.run(request("b", prompt="x", model=by_path))

    assert engine.loaded_models() == [by_path]


@pytest.mark.timeout(120)
def test_unknown_and_unloadable_models(engine: DiffusionEngine) -> None:
    unknown, missing = engine.run_batch(
        [request("a", prompt="x", model="builtin:nope"), request("b", prompt="x", model="/nonexistent/model")]
    )

    assert isinstance(unknown, RequestError) and "builtin:nope" in str(unknown)
    # A configured model that will not load is this worker's fault: another may have it.
    assert isinstance(missing, WorkerFault) and "/nonexistent/model" in str(missing)
    with pytest.raises(WorkerFault):
        engine.run(request("c", prompt="x", model="/nonexistent/model"))


@pytest.mark.timeout(180)
def test_two_builders_at_once_leave_one_whole_model(tmp_path: Path) -> None:
    # Given an empty model dir, When two threads build the tiny model at the same moment
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: builtin_path(MODEL, tmp_path), range(2)))

    # Then both get the same folder, the loser's copy is gone, and the model loads
    assert paths == [tmp_path / "tiny-sd"] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd"]
    engine = DiffusionEngine(model_dir=tmp_path)
    assert "images" in engine.run(request("j", prompt="x"))


@pytest.mark.timeout(180)
def test_concurrent_runs_share_one_loaded_pipeline(model_dir: Path) -> None:
    engine = DiffusionEngine(model_dir=model_dir)

    with ThreadPoolExecutor(3) as pool:
        outputs = list(pool.map(lambda n: engine.run(request(str(n), prompt="same", seed=3)), range(3)))

    assert engine.loaded_models() == [MODEL]
    assert len({output["images"][0].data for output in outputs}) == 1


@pytest.mark.timeout(120)
def test_images_are_encoded_by_whoever_reads_them_not_by_the_device_call(engine: DiffusionEngine) -> None:
    # Given a batch of two jobs run on the device
    outputs = engine.run_batch([request("a", prompt="one", seed=1), request("b", prompt="two", seed=2)])
    artifacts = [output(result)["images"][0] for result in outputs]

    # Then no image was encoded during the call: each job's task thread encodes its own
    assert all("data" not in vars(artifact) for artifact in artifacts)
    with ThreadPoolExecutor(2) as pool:
        encoded = list(pool.map(lambda artifact: artifact.data, artifacts))
    assert [Image.open(io.BytesIO(data)).format for data in encoded] == ["PNG", "PNG"]
    # and reading again gives the same bytes without encoding twice
    assert [artifact.data for artifact in artifacts] == encoded
    assert all(artifact.data is data for artifact, data in zip(artifacts, encoded, strict=True))
