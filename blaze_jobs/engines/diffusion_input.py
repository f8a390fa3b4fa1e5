"""A diffusion request read into a job: its defaults resolved, its input checked, its images encoded.

The engine (``engines.diffusion``) runs the pipeline; this module only reads requests and
encodes images, so it imports neither torch nor diffusers.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from blaze_jobs.engines.base import Artifact, EngineRequest, read_int, read_seed, request_territory
from blaze_jobs.engines.spec import CommaList, JSONInt, OptionalJSONInt
from blaze_jobs.errors import RequestError, WorkerFault
from blaze_jobs.input_images import parse_source

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from blaze_jobs.input_images import InputImages

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
    # No defaults here: each model family has its own (``_resolve``'s ``defaults``).
    num_inference_steps: OptionalJSONInt = Field(
        None,
        ge=1,
        description="Denoising steps; more is slower and finer. Defaults to the model's own (20 for SD 1.x/2.x).",
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=50,
        description="How strongly the image follows the prompt. Defaults to the model's own (7.5 for Stable Diffusion).",
    )
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
    image: str | None = Field(
        None,
        min_length=1,
        description="An image to start from (image-to-image; inpainting with `mask`): an `https` URL, a `data:` URI of a "
        "PNG, JPEG or WebP image, or an earlier job's artifact, by its `/v1/artifacts/<key>` URL as the job's output gives "
        "it (signed or not; an artifact of a job of the caller's tenant). Bounded in bytes and pixels "
        "(BLAZE_MAX_INPUT_IMAGE_BYTES, BLAZE_MAX_INPUT_IMAGE_PIXELS); an https URL must lead to a public address, "
        "answer 200 without a redirect, "
        "and is not cached. Without width and height the job takes the image's size (scaled down to the size bounds, "
        "rounded down to a multiple of 8); with them the image is resized to them.",
    )
    mask: str | None = Field(
        None,
        min_length=1,
        description="Inpainting: which part of `image` to repaint (white) and which to keep (black), in the same forms "
        "as `image`; resized to the image's size. Needs `image`.",
    )
    strength: float | None = Field(
        None,
        ge=0,
        le=1,
        description="How far to move from `image`: 0 keeps it, 1 repaints it whole. Defaults to 0.8; needs `image`.",
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
    #: An input image's bytes (fetched, read from an artifact or in a data: URI): 10 MiB holds
    #: any photo a phone takes as JPEG, and bounds what a download or a decode costs a worker.
    #: A data: URI is bounded first by the job's input as stored (BLAZE_MAX_INPUT_BYTES).
    max_input_image_bytes: int = 10 * 1024 * 1024
    #: An input image's pixels, read from its header before it is decoded: 4096x4096 is four
    #: times the largest output and takes 64 MiB as RGBA, so a small file that declares a huge
    #: canvas (a decompression bomb) is refused before any memory is spent on it.
    max_input_image_pixels: int = 4096 * 4096
    #: How long fetching an https input image may take in all (connect, TLS, every read).
    input_image_timeout_s: float = 10.0


#: What a job computes: from the prompt alone, from an image, or filling an image's mask.
Task = Literal["text2img", "img2img", "inpaint"]
#: A request's strength when it gives an image and no strength.
DEFAULT_STRENGTH = 0.8


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
    image: Image.Image | None = None  # RGB at width x height
    mask: Image.Image | None = None  # "L" at width x height, 255 = repaint
    strength: float = 1.0  # 1.0 without an image

    @property
    def task(self) -> Task:
        return "text2img" if self.image is None else "img2img" if self.mask is None else "inpaint"

    @property
    def key(self) -> tuple:
        return batch_key(
            self.request.model, self.width, self.height, self.steps, self.guidance_scale, self.scheduler, self.task, self.strength
        )


def batch_key(
    model: str,
    width: Any,
    height: Any,
    steps: Any,
    guidance: float,
    scheduler: str | None,
    task: Task = "text2img",
    strength: float = 1.0,
) -> tuple:
    """What one pipeline call must share. A named scheduler extends the key, and so do an
    input image's task and strength (they pick the pipeline and its timesteps); the model's
    own scheduler and text to image add nothing, so the keys of requests that name neither
    are what they always were."""
    key: tuple = (model, width, height, steps, guidance)
    if scheduler is not None:
        key = (*key, scheduler)
    return key if task == "text2img" else (*key, task, strength)


def _task(data: Mapping[str, Any]) -> Task:
    return "text2img" if data.get("image") is None else "img2img" if data.get("mask") is None else "inpaint"


def _image_size(image: Image.Image) -> tuple[int, int]:
    """The job size an input image gives: its own, rounded down to a multiple of 8."""
    return max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)


def request_key(request: EngineRequest, *, default_size: tuple[int, int] | None, defaults: Mapping[str, Any] = {}) -> tuple:
    """The batch key of ``request`` without resolving it: ``_Job.key`` of the same request once
    resolved. A size the request leaves out is its fetched image's, else ``default_size``;
    with neither (a model not loaded yet) it stays None, which only keeps such requests apart
    from ones that name the default size."""
    data = request.input
    width, height = data.get("width"), data.get("height")
    image = request.fetched.get("image") if data.get("image") is not None else None
    size = _image_size(image) if image is not None else default_size
    if size is not None:
        width, height = width or size[0], height or size[1]
    steps = data.get("num_inference_steps") or defaults.get("num_inference_steps", 20)
    guidance = data.get("guidance_scale")
    guidance = float(defaults.get("guidance_scale", 7.5) if guidance is None else guidance)
    task = _task(data)
    strength = data.get("strength")
    strength = 1.0 if task == "text2img" else float(DEFAULT_STRENGTH if strength is None else strength)
    return batch_key(request.model, width, height, steps, guidance, scheduler_name(data.get("scheduler")), task, strength)


def cacheable(data: dict[str, Any]) -> bool:
    """Whether a request's output may be cached: seeded, and no image by https URL (what a URL
    serves may change; a data URI or an artifact is its content)."""
    if data.get("seed") is None:
        return False
    for name in ("image", "mask"):
        value = data.get(name)
        if value is not None:
            try:
                if parse_source(f"input.{name}", value).kind == "https":
                    return False
            except RequestError:
                return False  # refused anyway; nothing to cache
    return True


def _resolve(
    request: EngineRequest,
    *,
    default_size: tuple[int, int],
    max_steps: int | None = None,
    schedulers: Collection[str] = SCHEDULERS,
    defaults: Mapping[str, Any] = {},
    images: InputImages | None = None,
) -> _Job:
    """``request`` read into a job. ``defaults``: the model family's ``num_inference_steps`` and
    ``guidance_scale`` (20 and 7.5 when absent). ``images`` fetches the request's input images
    when nothing fetched them yet (a direct caller of ``run_batch``, not the batcher)."""
    # Resolving a request reads only its input: whatever fails here is the request's
    # (engines.base), even an error of a kind that no check below foresaw.
    with request_territory(f"input for {request.model!r}"):
        if images is not None:
            images.fetch(request)
        return _read(request, default_size=default_size, max_steps=max_steps, schedulers=schedulers, defaults=defaults)


def _read(
    request: EngineRequest,
    *,
    default_size: tuple[int, int],
    max_steps: int | None,
    schedulers: Collection[str],
    defaults: Mapping[str, Any],
) -> _Job:
    # The API validated the input already; these checks guard direct callers and keep a
    # bad value from failing a whole batch inside the pipeline.
    data = request.input
    prompt, negative = data.get("prompt"), data.get("negative_prompt") or ""
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise RequestError("prompt (required) and negative_prompt must be strings")
    image, mask, strength = _read_images(request)
    if image is not None:
        default_size = _image_size(image)
    width = read_int(data, "width", default_size[0], minimum=8)
    height = read_int(data, "height", default_size[1], minimum=8)
    for field, value in (("width", width), ("height", height)):
        if value % 8:
            raise RequestError(f"{field}: must be a multiple of 8, got {value}")
    output_format = data.get("output_format") or "png"
    if output_format not in _FORMATS:
        raise RequestError(f"output_format: must be one of {sorted(_FORMATS)}, got {output_format!r}")
    guidance = data.get("guidance_scale")
    steps = read_int(data, "num_inference_steps", defaults.get("num_inference_steps", 20), minimum=1)
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
        guidance_scale=float(defaults.get("guidance_scale", 7.5) if guidance is None else guidance),
        seed=read_seed(data),
        num_outputs=read_int(data, "num_outputs", 1, minimum=1),
        output_format=output_format,
        scheduler=scheduler,
        image=None if image is None else _sized(image, width, height, "RGB"),
        # A mask painted at another size than the image is scaled to it (nearest, so that
        # black stays black), not refused: people draw masks on previews.
        mask=None if mask is None else _sized(mask, width, height, "L"),
        strength=strength,
    )


def _read_images(request: EngineRequest) -> tuple[Image.Image | None, Image.Image | None, float]:
    """The request's fetched image and mask, and its strength (1.0 without an image)."""
    data = request.input
    if data.get("image") is None:
        for name in ("mask", "strength"):
            if data.get(name) is not None:
                raise RequestError(f"input.{name}: needs input.image")
        return None, None, 1.0
    strength = data.get("strength")
    strength = DEFAULT_STRENGTH if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise RequestError(f"input.strength: must be a number from 0 to 1, got {strength!r}")
    image, mask = request.fetched.get("image"), request.fetched.get("mask")
    if image is None or (mask is None and data.get("mask") is not None):
        # The engine's own order (fetch_inputs, or _resolve's images) failed: not the request's.
        raise WorkerFault("the request's input images were not fetched before it was resolved")
    return image, mask, float(strength)


def _sized(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    from PIL import Image

    image = image if image.mode == mode else image.convert(mode)
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.NEAREST if mode == "L" else Image.Resampling.LANCZOS)


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
