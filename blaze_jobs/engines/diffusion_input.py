"""A diffusion request read into a job: its defaults resolved, its input checked, its images encoded.

The engine (``engines.diffusion``) runs the pipeline; this module only reads requests and
encodes images, so it imports neither torch nor diffusers.
"""

from __future__ import annotations

import io
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from blaze_jobs.engines.base import Artifact, EngineRequest, read_int, read_seed, request_territory
from blaze_jobs.engines.spec import CommaList, JSONInt, OptionalJSONInt
from blaze_jobs.errors import RequestError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

#: The schedulers a Stable Diffusion 1.x/2.x pipeline takes by name: diffusers'
#: ``KarrasDiffusionSchedulers`` less ``DPMSolverSDEScheduler`` and ``LMSDiscreteScheduler``
#: (they need torchsde and scipy, which Blaze Jobs does not install) and ``EDMEulerScheduler``
#: (made for EDM-trained models). Written out, not read from diffusers,
#: so that the API checks a name without importing it; tests/test_schedulers.py holds the
#: list to the built-in model's ``scheduler.compatibles``.
SchedulerName = Literal[
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)

#: Short names people know from other tools, and every name in any case.
SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "deis": "DEISMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++_2m": "DPMSolverMultistepScheduler",
    "dpm++_s": "DPMSolverSinglestepScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm2_a": "KDPM2AncestralDiscreteScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    **{name.lower(): name for name in SCHEDULERS},
}


def scheduler_name(value: Any) -> Any:
    """A scheduler's diffusers class name from any name ``SCHEDULER_ALIASES`` knows; any
    other value unchanged, for the caller to refuse."""
    return SCHEDULER_ALIASES.get(value.lower(), value) if isinstance(value, str) else value


class DiffusionInput(BaseModel):
    """Input of an image job. Bounds beyond the ones shown are deployment settings
    (``BLAZE_MAX_WIDTH``, ``BLAZE_MAX_PIXELS``, ``BLAZE_MAX_STEPS`` …)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="What the image should show.")
    negative_prompt: str | None = Field(None, description="What the image should avoid.")
    width: OptionalJSONInt = Field(
        None, ge=8, multiple_of=8, description="Width in pixels, a multiple of 8. Defaults to the model's own size."
    )
    height: OptionalJSONInt = Field(
        None, ge=8, multiple_of=8, description="Height in pixels, a multiple of 8. Defaults to the model's own size."
    )
    num_inference_steps: JSONInt = Field(20, ge=1, description="Denoising steps; more is slower and finer.")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="How strongly the image follows the prompt.")
    seed: OptionalJSONInt = Field(
        None,
        ge=0,
        le=2**32 - 1,
        description="Random seed. The same seed and input give the same image bytes. "
        "Drawn at random (and reported in the output) when absent.",
    )
    num_outputs: JSONInt = Field(1, ge=1, description="How many images; image i uses seed + i.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Encoding of the images.")
    scheduler: Annotated[SchedulerName | None, BeforeValidator(scheduler_name)] = Field(
        None,
        description="The scheduler (sampler) that denoises the image, by its diffusers class name; "
        "short names (ddim, euler, euler_a, dpm++, heun, pndm, unipc …) and any case are read too. "
        "Defaults to the model's own.",
    )


class DiffusionSettings(BaseModel):
    diffusion_model: str = "builtin:tiny-sd"
    #: Models a request may name besides ``diffusion_model`` (comma-separated ids or paths).
    #: A model not listed is refused at submission, so one request cannot make a worker
    #: load arbitrary weights.
    diffusion_models: CommaList = Field(default_factory=list)
    # Bounds on diffusion input. A 1024x1024 image is the largest common SD size; 150 steps
    # is beyond any scheduler's useful range; 8 outputs keep one job from hogging a device.
    max_width: int = 1024
    max_height: int = 1024
    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_outputs: int = 8
    #: CLIP reads 77 tokens; 2,000 characters is far beyond that yet bounds request size.
    max_prompt_chars: int = 2_000


@dataclass
class _Job:
    # A request with every default resolved, so that a retry reuses the same seeds.
    request: EngineRequest
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_outputs: int
    output_format: str
    scheduler: str | None  # None: the model's own

    @property
    def key(self) -> tuple:
        return batch_key(self.request.model, self.width, self.height, self.steps, self.guidance_scale, self.scheduler)


def batch_key(model: str, width: Any, height: Any, steps: Any, guidance: float, scheduler: str | None) -> tuple:
    """What one pipeline call must share. A named scheduler extends the key; the model's own
    adds nothing, so the keys of requests that name none are what they always were."""
    key = (model, width, height, steps, guidance)
    return key if scheduler is None else (*key, scheduler)


def _resolve(
    request: EngineRequest,
    *,
    default_size: tuple[int, int],
    max_steps: int | None = None,
    schedulers: Collection[str] = SCHEDULERS,
) -> _Job:
    # Resolving a request reads only its input: whatever fails here is the request's
    # (engines.base), even an error of a kind that no check below foresaw.
    with request_territory(f"input for {request.model!r}"):
        return _read(request, default_size=default_size, max_steps=max_steps, schedulers=schedulers)


def _read(request: EngineRequest, *, default_size: tuple[int, int], max_steps: int | None, schedulers: Collection[str]) -> _Job:
    # The API validated the input already; these checks guard direct callers and keep a
    # bad value from failing a whole batch inside the pipeline.
    data = request.input
    prompt, negative = data.get("prompt"), data.get("negative_prompt") or ""
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise RequestError("prompt (required) and negative_prompt must be strings")
    width = read_int(data, "width", default_size[0], minimum=8)
    height = read_int(data, "height", default_size[1], minimum=8)
    for field, value in (("width", width), ("height", height)):
        if value % 8:
            raise RequestError(f"{field}: must be a multiple of 8, got {value}")
    output_format = data.get("output_format") or "png"
    if output_format not in _FORMATS:
        raise RequestError(f"output_format: must be one of {sorted(_FORMATS)}, got {output_format!r}")
    guidance = data.get("guidance_scale")
    steps = read_int(data, "num_inference_steps", 20, minimum=1)
    if max_steps is not None and steps > max_steps:
        # The scheduler refuses more steps than the model was trained with.
        raise RequestError(f"num_inference_steps: this model takes at most {max_steps}, got {steps}")
    scheduler = scheduler_name(data.get("scheduler"))
    if scheduler is not None and scheduler not in schedulers:
        raise RequestError(f"scheduler: this model takes one of {sorted(schedulers)}, got {scheduler!r}")
    return _Job(
        request=request,
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=7.5 if guidance is None else float(guidance),
        seed=read_seed(data),
        num_outputs=read_int(data, "num_outputs", 1, minimum=1),
        output_format=output_format,
        scheduler=scheduler,
    )


def _default_size(pipe: StableDiffusionPipeline) -> tuple[int, int]:
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    return width * pipe.vae_scale_factor, height * pipe.vae_scale_factor


def _encode(image: Any, job: _Job, seed: int) -> Artifact:
    def render() -> bytes:
        buffer = io.BytesIO()
        # PIL writes no timestamp or metadata unless asked, so equal pixels give equal bytes.
        if job.output_format == "png":
            image.save(buffer, format="PNG")
        else:
            image.save(buffer, format=job.output_format.upper(), quality=90)
        return buffer.getvalue()

    return Artifact(
        render=render,
        content_type=_FORMATS[job.output_format],
        extension=job.output_format,
        meta={"width": image.width, "height": image.height, "seed": seed},
    )
