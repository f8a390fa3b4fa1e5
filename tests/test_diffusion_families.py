"""Diffusion model families: the table held to diffusers, a model's family known without
loading it, and the inputs a family does not take refused at the API's check and in the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blaze_jobs.engines.base import EngineRequest
from blaze_jobs.engines.diffusion import SPEC, DiffusionEngine, DiffusionInput
from blaze_jobs.engines.diffusion_families import FAMILIES, family_of
from blaze_jobs.engines.diffusion_pipelines import DiffusionMemorySettings, DiffusionModelOptions
from blaze_jobs.engines.spec import OutOfBounds
from blaze_jobs.errors import RequestError
from blaze_jobs.settings import Settings

pytestmark = pytest.mark.timeout(120)


class FamilySettings(Settings, DiffusionMemorySettings):
    pass


def settings(**options: DiffusionModelOptions) -> Settings:
    return FamilySettings(diffusion_model_options=options)


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


def tiny_sdxl(folder: Path) -> Path:
    """A Stable Diffusion XL pipeline of two seeded random text encoders, saved to ``folder``
    (until blaze_jobs/builtin_image_models.py builds builtin:tiny-sdxl)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from blaze_jobs.builtin_models import _build_tokenizer

    torch.manual_seed(0)
    # The UNet of diffusers' own SDXL tests: its added embedding reads the second encoder's
    # pooled 32 values and six time ids of 8 (32 + 48 = 80).
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=32,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=_build_tokenizer(),
        tokenizer_2=_build_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    )
    pipe.save_pretrained(folder)
    return folder


def test_an_sdxl_model_makes_images_of_its_own_size_by_text_and_from_an_image(tmp_path: Path) -> None:
    import numpy as np

    from tests.test_diffusion_engine import output, pixels
    from tests.test_image_to_image import data_uri, picture

    # Given an SDXL model folder, named by its path
    model = str(tiny_sdxl(tmp_path / "tiny-sdxl"))
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
