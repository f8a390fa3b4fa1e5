"""A deployment's memory options per diffusion model: validated, and applied at load."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from blaze_jobs.engines.base import EngineRequest
from blaze_jobs.engines.diffusion import DiffusionEngine
from blaze_jobs.engines.diffusion_pipelines import DiffusionModelOptions
from blaze_jobs.settings import Settings

pytestmark = pytest.mark.timeout(120)

MODEL = "builtin:tiny-sd"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def test_options_are_read_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLAZE_DIFFUSION_MODEL_OPTIONS", '{"builtin:tiny-sd": {"dtype": "bf16", "vae_tiling": true}}')

    options = Settings().diffusion_model_options

    assert options == {MODEL: DiffusionModelOptions(dtype="bf16", vae_tiling=True)}


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ('{"my/model": {"dtype": "fp8"}}', "diffusion_model_options.my/model.dtype"),
        ('{"my/model": {"vae_slicing": "yes"}}', "diffusion_model_options.my/model.vae_slicing"),
        ('{"my/model": {"offload": true}}', "diffusion_model_options.my/model.offload"),
        ('{"my/model": {"family": "dalle"}}', "diffusion_model_options.my/model.family"),
    ],
)
def test_a_bad_option_is_refused_naming_the_model_and_key(monkeypatch: pytest.MonkeyPatch, options: str, where: str) -> None:
    monkeypatch.setenv("BLAZE_DIFFUSION_MODEL_OPTIONS", options)

    with pytest.raises(ValidationError) as refused:
        Settings()

    assert where in str(refused.value)


def test_the_options_are_applied_when_the_model_loads(model_dir: Path) -> None:
    from diffusers.models.attention_processor import SlicedAttnProcessor

    # Given an engine whose model asks for bf16, attention slicing, VAE slicing and tiling,
    # and, on a CPU, the CUDA-only ones
    options = DiffusionModelOptions(
        dtype="bf16", attention_slicing=True, vae_slicing=True, vae_tiling=True, cpu_offload=True, compile=True
    )
    engine = DiffusionEngine(model_dir=model_dir, model_options={MODEL: options})

    # When a job runs
    (image,) = engine.run(EngineRequest(job_id="j", model=MODEL, input={"prompt": "a fox", "num_inference_steps": 2}))["images"]

    # Then the pipeline holds each option, the CUDA-only ones left out, and the image is whole
    import torch

    pipe = engine._pipeline(MODEL)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    processors = pipe.unet.attn_processors.values()
    assert processors and all(isinstance(processor, SlicedAttnProcessor) for processor in processors)
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert not hasattr(pipe.unet, "_hf_hook") and pipe.unet._compiled_call_impl is None
    assert Image.open(io.BytesIO(image.data)).size == (64, 64)
    engine.close()


def test_without_options_a_cpu_model_runs_in_full_precision(model_dir: Path) -> None:
    import torch

    engine = DiffusionEngine(model_dir=model_dir)
    engine.prepare(MODEL)
    pipe = engine._pipeline(MODEL)

    assert pipe.unet.dtype == torch.float32
    assert not any(type(p).__name__ == "SlicedAttnProcessor" for p in pipe.unet.attn_processors.values())
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling
    engine.close()
