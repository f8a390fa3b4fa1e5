"""Text-to-image with Stable Diffusion pipelines, several jobs per pipeline call.

torch and diffusers are imported only where the engine runs (``create``, the methods), so
the API reads this module's spec without loading them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blaze_jobs import builtin_models
from blaze_jobs.engines.base import Engine, EngineRequest
from blaze_jobs.engines.diffusion_input import (
    _FORMATS,
    SCHEDULERS,
    DiffusionInput,
    DiffusionSettings,
    _default_size,
    _encode,
    _Job,
    _resolve,
    batch_key,
    scheduler_name,
)
from blaze_jobs.engines.spec import (
    ArtifactKind,
    Batching,
    Bound,
    BuiltinModel,
    EngineSpec,
    OutOfBounds,
)
from blaze_jobs.errors import BlazeError, JobCanceled, RequestError, WorkerFault

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from blaze_jobs.settings import Settings

logger = logging.getLogger(__name__)


def _check(image: DiffusionInput, settings: Settings, model: str) -> None:
    if image.width and image.height and image.width * image.height > settings.max_pixels:
        raise OutOfBounds("input.width", f"{image.width}x{image.height} exceeds the limit of {settings.max_pixels} pixels")


def _create(settings: Settings, *, device: str | None = None, max_batch: int | None = None) -> DiffusionEngine:
    # Static batches are bounded by the batcher, not the engine.
    return DiffusionEngine(
        model_dir=settings.model_dir, device=device or settings.device, max_loaded_models=settings.max_loaded_models
    )


SPEC = EngineSpec(
    name="diffusion",
    input_model=DiffusionInput,
    description="An image job, run by a diffusers pipeline.",
    batching=Batching.static,
    create=_create,
    settings=DiffusionSettings,
    default_model_setting="diffusion_model",
    allowed_models_setting="diffusion_models",
    bounds=(
        Bound(DiffusionInput, "prompt", "max_prompt_chars", "characters"),
        Bound(DiffusionInput, "negative_prompt", "max_prompt_chars", "characters"),
        Bound(DiffusionInput, "width", "max_width", "pixels"),
        Bound(DiffusionInput, "height", "max_height", "pixels"),
        Bound(DiffusionInput, "num_inference_steps", "max_steps", "steps"),
        Bound(DiffusionInput, "num_outputs", "max_outputs", "images"),
    ),
    check=_check,
    artifacts=tuple(ArtifactKind(extension, content_type) for extension, content_type in _FORMATS.items()),
    builtin_models=(
        BuiltinModel(
            id="builtin:tiny-sd", revision="1", folder="tiny-sd", marker="model_index.json", build=builtin_models.tiny_sd
        ),
    ),
)


class DiffusionEngine(Engine):
    """Runs ``StableDiffusionPipeline`` jobs, keeping the last few pipelines loaded."""

    spec = SPEC

    def __init__(self, *, model_dir: Path, device: str = "cpu", max_loaded_models: int = 2) -> None:
        import torch

        self.model_dir = Path(model_dir)
        self.device = device
        self.max_loaded_models = max(1, max_loaded_models)
        self._dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self._pipelines: OrderedDict[str, StableDiffusionPipeline] = OrderedDict()
        # Default (width, height) of each model ever loaded, kept after eviction: batch_key
        # reads it without loading anything.
        self._default_sizes: dict[str, tuple[int, int]] = {}
        self._load_lock = threading.Lock()
        # What is loaded, for readers that must not wait for a load (the heartbeat: a load
        # can take longer than a lease): replaced, never changed, under the load lock.
        self._loaded: tuple[str, ...] = ()
        # A pipeline call mutates its scheduler, and the device runs one batch at a time anyway.
        self._run_lock = threading.Lock()

    def loaded_models(self) -> list[str]:
        """The models now in memory, least recently used first (never waits for a load)."""
        return list(self._loaded)

    def batch_key(self, request: EngineRequest) -> tuple:
        """Model, size, steps, guidance scale and scheduler: what one pipeline call must share.

        A missing size resolves to the model's default once the model has been loaded;
        before that it stays None, which only keeps such requests apart from ones that
        name the default size explicitly.
        """
        data = request.input
        width, height = data.get("width"), data.get("height")
        default = self._default_sizes.get(request.model)
        if default is not None:
            width, height = width or default[0], height or default[1]
        steps = data.get("num_inference_steps") or 20
        guidance = data.get("guidance_scale")
        scheduler = scheduler_name(data.get("scheduler"))
        return batch_key(request.model, width, height, steps, 7.5 if guidance is None else float(guidance), scheduler)

    def run_batch(self, requests: list[EngineRequest]) -> list[dict[str, Any] | BaseException]:
        """Generate every request's images, with one pipeline call per batch key."""
        results: list[dict[str, Any] | BaseException | None] = [None] * len(requests)
        # 1. Load each model once and resolve every request's defaults against it.
        jobs: dict[int, _Job] = {}
        pipes: dict[str, StableDiffusionPipeline] = {}
        for model in dict.fromkeys(r.model for r in requests):
            members = [i for i, r in enumerate(requests) if r.model == model]
            try:
                pipes[model] = self._pipeline(model)
            except BlazeError as exc:
                for i in members:
                    results[i] = exc
                continue
            scheduler = pipes[model].scheduler
            max_steps = getattr(scheduler.config, "num_train_timesteps", None)
            schedulers = {kind.__name__ for kind in scheduler.compatibles} & set(SCHEDULERS)
            for i in members:
                try:
                    jobs[i] = _resolve(
                        requests[i], default_size=self._default_sizes[model], max_steps=max_steps, schedulers=schedulers
                    )
                except RequestError as exc:
                    results[i] = exc
        # 2. One pipeline call per group of equal keys (a caller normally sends one group).
        groups: dict[tuple, list[int]] = {}
        for i, job in jobs.items():
            groups.setdefault(job.key, []).append(i)
        for members in groups.values():
            outputs = self._run_group(pipes[requests[members[0]].model], [jobs[i] for i in members])
            for i, output in zip(members, outputs, strict=False):
                results[i] = output
        return results  # type: ignore[return-value]  # every slot is filled above

    def prepare(self, model: str) -> None:
        """Load (and for a built-in model, build) ``model`` before the first job needs it."""
        self._pipeline(model)

    def close(self) -> None:
        """Drop every loaded pipeline and release cached device memory."""
        with self._load_lock:
            self._pipelines.clear()
            self._loaded = ()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # --- loading ------------------------------------------------------------------------

    def _pipeline(self, model: str) -> StableDiffusionPipeline:
        with self._load_lock:
            try:
                pipe = self._pipelines.get(model)
                if pipe is not None:
                    self._pipelines.move_to_end(model)
                    return pipe
                # Evict first, so the new model has the memory the old one held.
                while len(self._pipelines) >= self.max_loaded_models:
                    evicted, _ = self._pipelines.popitem(last=False)
                    logger.info("evicted diffusion model %s", evicted)
                    if self.device.startswith("cuda"):
                        import torch

                        torch.cuda.empty_cache()
                self._loaded = tuple(self._pipelines)
                pipe = self._load(model)
                self._pipelines[model] = pipe
                self._default_sizes[model] = _default_size(pipe)
                return pipe
            finally:
                self._loaded = tuple(self._pipelines)

    def _load(self, model: str) -> StableDiffusionPipeline:
        from diffusers import StableDiffusionPipeline

        try:
            path: str | Path = builtin_models.builtin_path(model, self.model_dir) if model.startswith("builtin:") else model
            # The model was configured for this deployment (the API refuses others), so a
            # failure here is this worker's: missing files, no network, no memory.
            pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            # Cast after loading: diffusers 0.42 renamed from_pretrained's torch_dtype to
            # dtype, and older versions ignore the new name without a word.
            pipe = pipe.to(self.device, self._dtype)
        except BlazeError:
            raise
        except Exception as exc:
            raise WorkerFault(f"could not load diffusion model {model!r} on {self.device}: {exc}") from exc
        logger.info("loaded diffusion model %s on %s", model, self.device)
        return pipe

    # --- running ------------------------------------------------------------------------

    def _run_group(self, pipe: StableDiffusionPipeline, jobs: list[_Job]) -> list[dict[str, Any] | BaseException]:
        try:
            return self._generate(pipe, jobs)
        except Exception as exc:
            if len(jobs) == 1:
                return [self._fault(exc, jobs[0])]
            out_of_memory = _is_out_of_memory(exc)
        # Retry only once out of the except block: its exception holds the failed call's
        # tensors, which the smaller retries need the memory of.
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        if out_of_memory:
            half = len(jobs) // 2
            return self._run_group(pipe, jobs[:half]) + self._run_group(pipe, jobs[half:])
        # Run each alone, so that one bad member fails only itself.
        return [result for job in jobs for result in self._run_group(pipe, [job])]

    def _fault(self, exc: Exception, job: _Job) -> BaseException:
        # On the device every error is the worker's, whatever its type: the request was
        # resolved and checked before (``_resolve``), so a ValueError here is an engine or
        # library bug, and one that a request's content still provokes faults every worker
        # it meets, which fails it as the request's own (worker.py).
        if isinstance(exc, BlazeError):
            return exc
        if _is_out_of_memory(exc):
            # Drop the traceback, and with it the tensors of the failed call.
            exc.__traceback__ = None
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            what = f"{job.num_outputs} image(s) of {job.width}x{job.height} with {job.request.model!r}"
            error: BlazeError = WorkerFault(f"out of memory generating {what} on {self.device}")
        else:
            error = WorkerFault(f"diffusion pipeline failed with {job.request.model!r} on {self.device}: {exc!r}")
        error.__cause__ = exc
        return error

    def _generate(self, pipe: StableDiffusionPipeline, jobs: list[_Job]) -> list[dict[str, Any] | BaseException]:
        import torch

        # 1. Jobs canceled while queued cost nothing.
        stopped = [job.request.should_stop() for job in jobs]
        running = [i for i, stop in enumerate(stopped) if not stop]
        if not running:
            return [JobCanceled(job.request.job_id) for job in jobs]
        first = jobs[running[0]]

        # 2. One prompt, seed and starting noise per image. The noise is drawn on the CPU from
        # each image's own generator, so it is the same whatever the device and whatever else
        # shares the batch. (The images then agree to about 2e-6 but not bit for bit: batched
        # kernels sum in another order, so a rare 8-bit pixel value may differ by one.)
        images_of = [(jobs[i], n) for i in running for n in range(jobs[i].num_outputs)]
        generators = [torch.Generator(device="cpu").manual_seed(job.seed + n) for job, n in images_of]
        factor = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, first.height // factor, first.width // factor)
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])

        # 3. Report progress the way diffusers counts steps (a PNDM run of 20 steps makes 21
        # UNet calls, the first a warm-up), and interrupt once every job wants to stop.
        done = 0

        def on_step_end(pipe: StableDiffusionPipeline, i: int, t: Any, kwargs: dict) -> dict:
            nonlocal done
            order, total = pipe.scheduler.order, pipe.num_timesteps
            if i == total - 1 or (i + 1 > total - first.steps * order and (i + 1) % order == 0):
                done += 1
                for j in running:
                    on_progress = jobs[j].request.on_progress
                    if not stopped[j] and on_progress is not None:
                        on_progress(done, first.steps)
            for j in running:
                stopped[j] = stopped[j] or jobs[j].request.should_stop()
            if all(stopped[j] for j in running):
                pipe._interrupt = True  # diffusers skips the remaining steps
            return kwargs

        # 4. The pipeline call itself, on a pipeline of the job's scheduler if it names one.
        scheduled = _with_scheduler(pipe, first.scheduler)
        with self._run_lock, torch.inference_mode():
            images = scheduled(
                prompt=[job.prompt for job, _ in images_of],
                negative_prompt=[job.negative_prompt for job, _ in images_of],
                width=first.width,
                height=first.height,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                generator=generators,
                latents=latents.to(self.device, self._dtype),
                output_type="pil",
                callback_on_step_end=on_step_end,
            ).images

        # 5. Each job's images, unless it was canceled meanwhile; its task thread encodes them.
        results: list[dict[str, Any] | BaseException] = []
        for i, job in enumerate(jobs):
            if stopped[i] or job.request.should_stop():
                results.append(JobCanceled(job.request.job_id))
                continue
            mine = [(image, job.seed + n) for image, (owner, n) in zip(images, images_of, strict=False) if owner is job]
            results.append({"images": [_encode(image, job, seed) for image, seed in mine]})
        return results


def _with_scheduler(pipe: StableDiffusionPipeline, name: str | None) -> StableDiffusionPipeline:
    # A scheduler holds the timesteps of the call it serves, so each call gets a fresh one,
    # on a pipeline of its own that shares every other part of the loaded one: the loaded
    # pipeline keeps its scheduler for the next batch.
    if name is None:
        return pipe
    import diffusers

    scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    # Not ``from_pipe``: it casts the shared parts to a dtype again, and warns, on every call.
    parts = {**pipe.components, "scheduler": scheduler}
    scheduled = type(pipe)(**parts, requires_safety_checker=pipe.config.requires_safety_checker)
    scheduled.set_progress_bar_config(disable=True)
    return scheduled


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError exists since torch 1.13 (torch.OutOfMemoryError only since
    # 2.5). CUDA says "out of memory"; the CPU allocator says "can't allocate memory".
    import torch

    message = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    )
