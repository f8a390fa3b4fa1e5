"""Diffusers pipelines as the diffusion engine holds them: loaded with the deployment's memory
options, and the pipelines derived from a loaded one (image to image, inpainting, another
scheduler), which share its weights.

torch and diffusers are imported inside the functions that run on a worker; the options
model is read by the settings, so the API imports this module too.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from blaze_jobs.engines.diffusion_families import FAMILIES
from blaze_jobs.engines.diffusion_input import Task
from blaze_jobs.errors import BlazeError, RequestError, WorkerFault

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from blaze_jobs.engines.diffusion_input import _Job

logger = logging.getLogger(__name__)


class DiffusionModelOptions(BaseModel):
    """How a worker loads one model: its precision, and what trades speed for memory."""

    model_config = ConfigDict(extra="forbid", strict=True)

    #: None: fp16 on CUDA, fp32 on a CPU (which runs fp16 slowly, if at all).
    dtype: Literal["fp32", "fp16", "bf16"] | None = None
    #: Attention in slices, one head group at a time: less peak memory, a little slower.
    attention_slicing: bool = False
    #: The VAE decodes one image of a batch at a time.
    vae_slicing: bool = False
    #: The VAE decodes in overlapping tiles: large images in little memory.
    vae_tiling: bool = False
    #: Each part of the model moves to the GPU only while it runs (CUDA only; accelerate).
    cpu_offload: bool = False
    #: ``torch.compile`` the denoiser (CUDA only: the first call compiles, minutes).
    compile: bool = False
    #: The model's family (``diffusion_families.FAMILIES``), for a model the API cannot read
    #: it from: a Hugging Face id not yet in this host's cache.
    family: str | None = None

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        if value is not None and value not in FAMILIES:
            raise ValueError(f"must be one of {sorted(FAMILIES)}, got {value!r}")
        return value


class DiffusionMemorySettings(BaseModel):
    #: Options per model id, as JSON: ``{"stabilityai/sdxl-turbo": {"dtype": "bf16",
    #: "vae_tiling": true}}`` (``BLAZE_DIFFUSION_MODEL_OPTIONS``). A model left out loads
    #: with every option off. An unknown key or a bad value fails start-up, naming the model
    #: and the key.
    diffusion_model_options: dict[str, DiffusionModelOptions] = Field(default_factory=dict)


def load_pipeline(model: str, path: str | Path, *, device: str, options: DiffusionModelOptions) -> DiffusionPipeline:
    """The text-to-image pipeline of ``model`` (at ``path``) on ``device``, with ``options``
    applied. Any failure is this worker's: a WorkerFault saying why."""
    try:
        pipe = _from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        _apply(pipe, model, device=device, options=options)
    except BlazeError:
        raise
    except Exception as exc:
        # The model was configured for this deployment (the API refuses others), so a
        # failure here is this worker's: missing files, no network, no memory.
        raise WorkerFault(f"could not load diffusion model {model!r} on {device}: {exc}") from exc
    logger.info("loaded diffusion model %s (%s) on %s", model, type(pipe).__name__, device)
    return pipe


def _from_pretrained(path: str | Path) -> DiffusionPipeline:
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    index = DiffusionPipeline.load_config(path)
    # Only a pipeline with a safety checker is told to go without one: any other would warn
    # about an argument it ignores.
    extra: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    # A component the folder records as absent ([null, null]) loads as absent: an SD 3 saved
    # without its T5 encoder, as people run it, is refused otherwise (T5 is not optional).
    extra.update({name: None for name, entry in index.items() if entry == [None, None]})
    try:
        return AutoPipelineForText2Image.from_pretrained(path, **extra)
    except ValueError as exc:
        if "AutoPipeline can't find a pipeline linked to" not in str(exc):
            raise
    # A family the auto class does not map: the pipeline class the model names.
    return DiffusionPipeline.from_pretrained(path, **extra)


def _apply(pipe: DiffusionPipeline, model: str, *, device: str, options: DiffusionModelOptions) -> None:
    import torch

    cuda = device.startswith("cuda")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}[options.dtype]
    dtype = dtype or (torch.float16 if cuda else torch.float32)
    # Cast after loading: diffusers 0.42 renamed from_pretrained's torch_dtype to dtype, and
    # older versions ignore the new name without a word.
    if options.cpu_offload and cuda:
        pipe.to(dtype=dtype)
        pipe.enable_model_cpu_offload(device=device)
    else:
        if options.cpu_offload:
            logger.info("diffusion model %s: cpu_offload skipped, %s is not a CUDA device", model, device)
        pipe.to(device, dtype)
    if options.attention_slicing:
        if not any(hasattr(part, "set_attention_slice") for part in pipe.components.values()):
            logger.warning("diffusion model %s: %s has no attention slicing", model, type(pipe).__name__)
        pipe.enable_attention_slicing()
    vae = getattr(pipe, "vae", None)
    for option, switch in (("vae_slicing", "enable_slicing"), ("vae_tiling", "enable_tiling")):
        if getattr(options, option):
            if vae is None or not hasattr(vae, switch):
                raise WorkerFault(f"diffusion model {model!r}: its VAE has no {option.replace('_', ' ')}")
            getattr(vae, switch)()
    if options.compile:
        if cuda:
            denoiser = denoiser_of(pipe)
            # In place (Module.compile), so the pipeline keeps the module it registered.
            denoiser.compile()
        else:
            logger.info("diffusion model %s: compile skipped, %s is not a CUDA device", model, device)


def denoiser_of(pipe: DiffusionPipeline) -> Any:
    """The pipeline's UNet or transformer."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise WorkerFault(f"{type(pipe).__name__} has neither a UNet nor a transformer")
    return denoiser


def default_size(pipe: DiffusionPipeline) -> tuple[int, int]:
    """The model's own (width, height): its denoiser's sample size in latents, scaled by the VAE."""
    size = getattr(denoiser_of(pipe).config, "sample_size", None) or getattr(pipe, "default_sample_size", None) or 64
    height, width = (size, size) if isinstance(size, int) else size
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    return width * factor, height * factor


def derive(pipe: DiffusionPipeline, task: Task, *, field: str) -> DiffusionPipeline:
    """The image-to-image or inpainting pipeline of ``pipe``'s family, sharing its parts.

    RequestError naming ``field`` when the family has none: the request asked for what the
    model cannot do.
    """
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    auto = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForInpainting
    try:
        # from_pipe builds the new class from the loaded parts as they are (no copy, no cast).
        derived = auto.from_pipe(pipe)
    except ValueError as exc:
        what = "image to image" if task == "img2img" else "inpainting"
        raise RequestError(f"input.{field}: {type(pipe).__name__} models have no {what} pipeline") from exc
    derived.set_progress_bar_config(disable=True)
    return derived


def with_scheduler(pipe: DiffusionPipeline, name: str | None) -> DiffusionPipeline:
    """``pipe``, or with ``name`` given, a pipeline of a fresh scheduler of that name sharing
    every other part of ``pipe``."""
    # A scheduler holds the timesteps of the call it serves, so each call gets a fresh one,
    # on a pipeline of its own: the loaded pipeline keeps its scheduler for the next batch.
    if name is None:
        return pipe
    import diffusers

    scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    # Not ``from_pipe``: it casts the shared parts to a dtype again, and warns, on every call.
    kind = type(pipe)
    parts = {**pipe.components, "scheduler": scheduler}
    # The constructor's other arguments (requires_safety_checker, force_zeros_for_empty_prompt
    # …) are in the pipeline's config under their own names.
    accepted = inspect.signature(kind.__init__).parameters
    settings = {key: value for key, value in pipe.config.items() if key in accepted and key not in parts}
    scheduled = kind(**parts, **settings)
    scheduled.set_progress_bar_config(disable=True)
    return scheduled


def call_arguments(pipe: DiffusionPipeline, arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` less those the pipeline's call does not take (PixArt has no
    ``callback_on_step_end``, image to image no ``width``)."""
    accepted = inspect.signature(type(pipe).__call__).parameters
    return {key: value for key, value in arguments.items() if key in accepted}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory."""
    # torch.cuda.OutOfMemoryError exists since torch 1.13 (torch.OutOfMemoryError only since
    # 2.5). CUDA says "out of memory"; the CPU allocator says "can't allocate memory".
    import torch

    message = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    )


def denoising_steps(job: _Job) -> int:
    """The denoising steps the job's pipeline call runs: image to image starts part way,
    running ``min(int(steps * strength), steps)`` of them as diffusers does."""
    return job.steps if job.task == "text2img" else min(int(job.steps * job.strength), job.steps)


def task_arguments(pipe: DiffusionPipeline, images_of: list[tuple[_Job, int]], generators: list[Any]) -> dict[str, Any]:
    """The call arguments of one image per (job, n) in ``images_of`` that depend on the task."""
    import torch

    first = images_of[0][0]
    arguments: dict[str, Any] = {"width": first.width, "height": first.height}
    if first.task == "text2img":
        denoiser = getattr(pipe, "unet", None)
        if denoiser is not None:
            # The noise is drawn on the CPU from each image's own generator, so it is the same
            # whatever the device and whatever else shares the batch. (Transformer pipelines
            # pack their latents in shapes of their own: they draw them from the same list of
            # generators, one image each.)
            factor = pipe.vae_scale_factor
            shape = (1, denoiser.config.in_channels, first.height // factor, first.width // factor)
            latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
            arguments["latents"] = latents.to(denoiser.device, denoiser.dtype)
        return arguments
    # Image to image and inpainting draw each image's noise, and sample its encoded input,
    # from its own generator of the list, one image at a time.
    arguments["image"] = [job.image for job, _ in images_of]
    arguments["strength"] = first.strength
    if first.task == "inpaint":
        arguments["mask_image"] = [job.mask for job, _ in images_of]
    return arguments


def finish(image: Any, job: _Job) -> Any:
    """The pipeline's image as the job gets it: an inpainted one has the input's every pixel
    outside the mask, exactly (a VAE round trip changes them all a little)."""
    from PIL import Image

    if job.task != "inpaint" or job.image is None or job.mask is None:
        return image
    return Image.composite(image.convert("RGB"), job.image, job.mask)
