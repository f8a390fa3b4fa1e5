"""Diffusion model families: the table held to diffusers, a model's family known without
loading it, and the inputs a family does not take refused at the API's check and in the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blaze_jobs.builtin_models import builtin_path
from blaze_jobs.engines.base import EngineRequest
from blaze_jobs.engines.diffusion import SPEC, DiffusionEngine, DiffusionInput
from blaze_jobs.engines.diffusion_families import FAMILIES, family_of
from blaze_jobs.engines.diffusion_pipelines import DiffusionModelOptions
from blaze_jobs.engines.spec import OutOfBounds
from blaze_jobs.errors import RequestError
from blaze_jobs.settings import Settings

pytestmark = pytest.mark.timeout(120)


def settings(**options: DiffusionModelOptions) -> Settings:
    return Settings(diffusion_model_options=options)


def check(model: str, settings: Settings, **input: Any) -> None:
    assert SPEC.check is not None
    SPEC.check(DiffusionInput(prompt="a fox", **input), settings, model)


def test_every_family_names_real_pipelines_and_refuses_images_only_without_their_pipelines() -> None:
    import diffusers

    for family in FAMILIES.values():
        assert all(hasattr(diffusers, name) for name in family.pipelines), family.name
        has_img2img = any("Img2Img" in name for name in family.pipelines)
        has_inpaint = any("Inpaint" in name for name in family.pipelines)
        assert ("image" in family.refuses) is not has_img2img, family.name
        assert ("mask" in family.refuses) is not has_inpaint, family.name
        assert set(family.defaults) <= {"num_inference_steps", "guidance_scale"}


def test_a_family_is_known_without_loading_the_model(tmp_path: Path) -> None:
    # Given a local folder naming its pipeline class, as every diffusers model folder does
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}), encoding="utf-8")

    # Then its family is read from it; a built-in id's is known; a declared one wins
    assert family_of(str(tmp_path)) is FAMILIES["flux"]
    assert family_of("builtin:tiny-sd") is FAMILIES["sd"]
    assert family_of(str(tmp_path), declared="sdxl") is FAMILIES["sdxl"]
    # and a Hugging Face id that is not in this host's cache has none yet
    assert family_of("nobody/not-a-cached-model") is None


def test_the_api_check_refuses_what_the_family_does_not_take(tmp_path: Path) -> None:
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}), encoding="utf-8")
    deployment = settings(**{"org/sd3-model": DiffusionModelOptions(family="sd3")})

    # A Flux model takes no negative prompt (an empty one asks for nothing)
    with pytest.raises(OutOfBounds) as refused:
        check(str(flux), deployment, negative_prompt="blurry")
    assert (refused.value.field, refused.value.message) == ("input.negative_prompt", "Flux models do not take negative_prompt")
    check(str(flux), deployment, negative_prompt="")

    # A model declared SD 3 takes no scheduler by name, and PixArt no input image
    with pytest.raises(OutOfBounds) as refused:
        check("org/sd3-model", deployment, scheduler="ddim")
    assert refused.value.field == "input.scheduler"
    with pytest.raises(OutOfBounds) as refused:
        check("org/pixart", settings(**{"org/pixart": DiffusionModelOptions(family="pixart")}), image="data:,x")
    assert refused.value.field == "input.image" and "PixArt" in refused.value.message

    # The built-in Stable Diffusion model takes all of them, and an unknown model is left to its worker
    check("builtin:tiny-sd", deployment, negative_prompt="blurry", scheduler="ddim", image="data:,x")
    check("nobody/unknown", deployment, negative_prompt="blurry")


def test_the_engine_refuses_after_loading_what_the_api_could_not_know(tmp_path: Path) -> None:
    # Given a worker told the built-in model is Flux-like (as a Hub model the API had not seen)
    engine = DiffusionEngine(model_dir=tmp_path, model_options={"builtin:tiny-sd": DiffusionModelOptions(family="flux")})
    batch = [
        EngineRequest(job_id="neg", model="builtin:tiny-sd", input={"prompt": "x", "negative_prompt": "fog"}),
        EngineRequest(job_id="ok", model="builtin:tiny-sd", input={"prompt": "x", "num_inference_steps": 2}),
    ]

    refused, ran = engine.run_batch(batch)

    # Then only the job with the refused input fails, as its own fault, naming the field
    assert isinstance(refused, RequestError) and str(refused) == "input.negative_prompt: Flux models do not take negative_prompt"
    assert not isinstance(ran, BaseException) and len(ran["images"]) == 1
    # and the family's defaults resolve the batch key (Flux: 28 steps, guidance 3.5)
    assert engine.batch_key(EngineRequest(job_id="k", model="builtin:tiny-sd", input={"prompt": "x"}))[3:5] == (28, 3.5)
    engine.close()


def test_an_sdxl_model_makes_images_of_its_own_size_by_text_and_from_an_image(tmp_path: Path) -> None:
    import numpy as np

    from tests.test_diffusion_engine import output, pixels
    from tests.test_image_to_image import data_uri, picture

    # Given an SDXL model folder (the built-in one's), named by its path
    model = str(builtin_path("builtin:tiny-sdxl", tmp_path))
    engine = DiffusionEngine(model_dir=tmp_path)
    assert family_of(model) is FAMILIES["sdxl"]

    def job(job_id: str, **input: Any) -> EngineRequest:
        return EngineRequest(job_id=job_id, model=model, input={"prompt": "a fox", "seed": 2, "num_inference_steps": 2, **input})

    # When it makes an image from text, with its own scheduler and a named one, and from an image
    batch = [job("t2i"), job("euler_a", scheduler="euler_a"), job("i2i", image=data_uri(picture()))]
    plain, named, from_image = engine.run_batch(batch)

    # Then its images are its own default size (sample size 8 x VAE factor 8), the named
    # scheduler changed the image, and an image job ran on SDXL's image-to-image pipeline
    (image,) = output(plain)["images"]
    assert (image.meta["width"], image.meta["height"]) == (64, 64)
    assert type(engine._pipeline(model)).__name__ == "StableDiffusionXLPipeline"
    assert not np.array_equal(pixels(image), pixels(output(named)["images"][0]))
    assert len(output(from_image)["images"]) == 1
    assert type(engine._load(model).derived["img2img"]).__name__ == "StableDiffusionXLImg2ImgPipeline"
    # and a request naming no steps takes SDXL's default
    assert engine.batch_key(EngineRequest(job_id="k", model=model, input={"prompt": "x"}))[3:5] == (30, 5.0)
    engine.close()
