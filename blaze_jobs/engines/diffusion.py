"""Images with diffusers pipelines of any text-to-image family: text to image, image to image
and inpainting, several jobs per pipeline call.

torch and diffusers are imported only where the engine runs (``create``, the methods), so
the API reads this module's spec without loading them. Families are in
``diffusion_families``; loading, memory options and derived pipelines in ``diffusion_pipelines``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blaze_jobs import builtin_models
from blaze_jobs.engines.base import Engine, EngineRequest
from blaze_jobs.engines.diffusion_families import FAMILIES, Family, family_of, family_of_pipeline, refuse, refused_field
from blaze_jobs.engines.diffusion_input import (
    _FORMATS,
    SCHEDULERS,
    DiffusionInput,
    DiffusionSettings,
    _encode,
    _Job,
    _resolve,
    cacheable,
    request_key,
)
from blaze_jobs.engines.diffusion_pipelines import (
    DiffusionModelOptions,
    Task,
    call_arguments,
    default_size,
    denoising_steps,
    derive,
    finish,
    is_out_of_memory,
    load_pipeline,
    task_arguments,
    with_scheduler,
)
from blaze_jobs.engines.spec import ArtifactKind, Batching, Bound, BuiltinModel, EngineSpec, OutOfBounds
from blaze_jobs.errors import BlazeError, JobCanceled, RequestError, WorkerFault

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from blaze_jobs.input_images import InputImages
    from blaze_jobs.settings import Settings

logger = logging.getLogger(__name__)


def _check(image: DiffusionInput, settings: Settings, model: str) -> None:
    if image.width and image.height and image.width * image.height > settings.max_pixels:
        raise OutOfBounds("input.width", f"{image.width}x{image.height} exceeds the limit of {settings.max_pixels} pixels")
    options = settings.diffusion_model_options.get(model)
    family = family_of(model, declared=options.family if options else None)
    if family is not None:
        name = refused_field(family, {name: getattr(image, name, None) for name in family.refuses})
        if name is not None:
            raise OutOfBounds(f"input.{name}", f"{family.label} models do not take {name}")


def _create(settings: Settings, *, device: str | None = None, max_batch: int | None = None) -> DiffusionEngine:
    # Static batches are bounded by the batcher, not the engine.
    return DiffusionEngine(
        model_dir=settings.model_dir,
        device=device or settings.device,
        max_loaded_models=settings.max_loaded_models,
        model_options=settings.diffusion_model_options,
        settings=settings,
    )


SPEC = EngineSpec(
    name="diffusion",
    input_model=DiffusionInput,
    description="An image job, run by a diffusers pipeline: text to image, image to image or inpainting.",
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
    cacheable=cacheable,
    artifacts=tuple(ArtifactKind(extension, content_type) for extension, content_type in _FORMATS.items()),
    builtin_models=(
        BuiltinModel(
            id="builtin:tiny-sd", revision="1", folder="tiny-sd", marker="model_index.json", build=builtin_models.tiny_sd
        ),
        BuiltinModel(
            id="builtin:tiny-sdxl", revision="1", folder="tiny-sdxl", marker="model_index.json", build=builtin_models.tiny_sdxl
        ),
        BuiltinModel(
            id="builtin:tiny-sd3", revision="1", folder="tiny-sd3", marker="model_index.json", build=builtin_models.tiny_sd3
        ),
    ),
)


@dataclass
class _Loaded:
    pipe: DiffusionPipeline
    family: Family | None  # None: a pipeline class no family lists
    #: Image-to-image and inpainting pipelines sharing ``pipe``'s parts, built on first use.
    derived: dict[Task, DiffusionPipeline] = field(default_factory=dict)


class DiffusionEngine(Engine):
    """Runs diffusers pipeline jobs, keeping the last few models loaded."""

    spec = SPEC

    def __init__(
        self,
        *,
        model_dir: Path,
        device: str = "cpu",
        max_loaded_models: int = 2,
        model_options: Mapping[str, DiffusionModelOptions] | None = None,
        settings: Settings | None = None,
    ) -> None:
        from blaze_jobs.input_images import InputImages
        from blaze_jobs.settings import Settings

        self.model_dir = Path(model_dir)
        self.device = device
        self.max_loaded_models = max(1, max_loaded_models)
        self.model_options = dict(model_options or {})
        self.input_images: InputImages = InputImages(settings or Settings())
        self._models: OrderedDict[str, _Loaded] = OrderedDict()
        # Default (width, height) and family of each model ever loaded, kept after eviction:
        # batch_key reads them without loading anything.
        self._default_sizes: dict[str, tuple[int, int]] = {}
        self._families: dict[str, Family | None] = {}
        self._load_lock = threading.Lock()
        # What is loaded, for readers that must not wait for a load (the heartbeat: a load
        # can take longer than a lease): replaced, never changed, under the load lock.
        self._loaded: tuple[str, ...] = ()
        # A pipeline call mutates its scheduler, and the device runs one batch at a time anyway.
        self._run_lock = threading.Lock()

    def loaded_models(self) -> list[str]:
        """The models now in memory, least recently used first (never waits for a load)."""
        return list(self._loaded)

    def fetch_inputs(self, request: EngineRequest) -> None:
        """Fetch the request's input image and mask, on its task thread, before it waits for the device."""
        self.input_images.fetch(request)

    def batch_key(self, request: EngineRequest) -> tuple:
        """What one pipeline call must share (``diffusion_input.request_key``).

        A missing size or step count resolves to the model's once the model has been loaded
        (or its family is known); before that it stays None, which only keeps such requests
        apart from ones that name the defaults explicitly.
        """
        family = self._family(request.model)
        return request_key(
            request, default_size=self._default_sizes.get(request.model), defaults=family.defaults if family else {}
        )

    def run_batch(self, requests: list[EngineRequest]) -> list[dict[str, Any] | BaseException]:
        """Generate every request's images, with one pipeline call per batch key."""
        results: list[dict[str, Any] | BaseException | None] = [None] * len(requests)
        # 1. Load each model once and resolve every request's defaults against it.
        jobs: dict[int, _Job] = {}
        loaded: dict[str, _Loaded] = {}
        for model in dict.fromkeys(r.model for r in requests):
            members = [i for i, r in enumerate(requests) if r.model == model]
            try:
                loaded[model] = self._load(model)
            except BlazeError as exc:
                for i in members:
                    results[i] = exc
                continue
            family, scheduler = loaded[model].family, loaded[model].pipe.scheduler
            max_steps = getattr(scheduler.config, "num_train_timesteps", None)
            schedulers = {kind.__name__ for kind in scheduler.compatibles} & set(SCHEDULERS)
            for i in members:
                try:
                    # The API refused these already when it knew the family; a model whose
                    # family it could not read is known now.
                    refuse(family, requests[i].input)
                    jobs[i] = _resolve(
                        requests[i],
                        default_size=self._default_sizes[model],
                        max_steps=max_steps,
                        schedulers=schedulers,
                        defaults=family.defaults if family else {},
                        images=self.input_images,
                    )
                except RequestError as exc:
                    results[i] = exc
        # 2. One pipeline call per group of equal keys (a caller normally sends one group),
        # on the pipeline of the group's task.
        groups: dict[tuple, list[int]] = {}
        for i, job in jobs.items():
            groups.setdefault(job.key, []).append(i)
        for members in groups.values():
            first = jobs[members[0]]
            try:
                pipe = self._task_pipeline(loaded[first.request.model], first.task)
            except BlazeError as exc:
                for i in members:
                    results[i] = exc
                continue
            outputs = self._run_group(pipe, [jobs[i] for i in members])
            for i, output in zip(members, outputs, strict=False):
                results[i] = output
        return results  # type: ignore[return-value]  # every slot is filled above

    def prepare(self, model: str) -> None:
        """Load (and for a built-in model, build) ``model`` before the first job needs it."""
        self._load(model)

    def close(self) -> None:
        """Drop every loaded pipeline, release cached device memory and the image fetcher's connections."""
        with self._load_lock:
            self._models.clear()
            self._loaded = ()
        self._empty_cache()
        self.input_images.close()

    # --- loading ------------------------------------------------------------------------

    def _pipeline(self, model: str) -> DiffusionPipeline:
        return self._load(model).pipe

    def _load(self, model: str) -> _Loaded:
        with self._load_lock:
            try:
                loaded = self._models.get(model)
                if loaded is not None:
                    self._models.move_to_end(model)
                    return loaded
                # Evict first, so the new model has the memory the old one held (its derived
                # pipelines go with it: they hold its parts).
                while len(self._models) >= self.max_loaded_models:
                    evicted, _ = self._models.popitem(last=False)
                    logger.info("evicted diffusion model %s", evicted)
                    self._empty_cache()
                self._loaded = tuple(self._models)
                path: str | Path = builtin_models.builtin_path(model, self.model_dir) if model.startswith("builtin:") else model
                options = self.model_options.get(model) or DiffusionModelOptions()
                pipe = load_pipeline(model, path, device=self.device, options=options)
                family = FAMILIES[options.family] if options.family else family_of_pipeline(type(pipe).__name__)
                loaded = self._models[model] = _Loaded(pipe=pipe, family=family)
                self._default_sizes[model] = default_size(pipe)
                self._families[model] = family
                return loaded
            finally:
                self._loaded = tuple(self._models)

    def _family(self, model: str) -> Family | None:
        if model in self._families:
            return self._families[model]
        options = self.model_options.get(model)
        return family_of(model, declared=options.family if options else None)

    def _task_pipeline(self, loaded: _Loaded, task: Task) -> DiffusionPipeline:
        if task == "text2img":
            return loaded.pipe
        with self._load_lock:
            if task not in loaded.derived:
                loaded.derived[task] = derive(loaded.pipe, task, field="mask" if task == "inpaint" else "image")
            return loaded.derived[task]

    def _empty_cache(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # --- running ------------------------------------------------------------------------

    def _run_group(self, pipe: DiffusionPipeline, jobs: list[_Job]) -> list[dict[str, Any] | BaseException]:
        try:
            return self._generate(pipe, jobs)
        except Exception as exc:
            if len(jobs) == 1:
                return [self._fault(exc, jobs[0])]
            out_of_memory = is_out_of_memory(exc)
        # Retry only once out of the except block: its exception holds the failed call's
        # tensors, which the smaller retries need the memory of.
        self._empty_cache()
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
        if is_out_of_memory(exc):
            # Drop the traceback, and with it the tensors of the failed call.
            exc.__traceback__ = None
            self._empty_cache()
            what = f"{job.num_outputs} image(s) of {job.width}x{job.height} with {job.request.model!r}"
            error: BlazeError = WorkerFault(
                f"out of memory generating {what} on {self.device}: the model's memory options (dtype, "
                "attention_slicing, vae_tiling, cpu_offload in BLAZE_DIFFUSION_MODEL_OPTIONS) may make it fit"
            )
        else:
            error = WorkerFault(f"diffusion pipeline failed with {job.request.model!r} on {self.device}: {exc!r}")
        error.__cause__ = exc
        return error

    def _generate(self, pipe: DiffusionPipeline, jobs: list[_Job]) -> list[dict[str, Any] | BaseException]:
        # 1. Jobs canceled while queued cost nothing.
        stopped = [job.request.should_stop() for job in jobs]
        running = [i for i, stop in enumerate(stopped) if not stop]
        if not running:
            return [JobCanceled(job.request.job_id) for job in jobs]
        first = jobs[running[0]]
        steps = denoising_steps(first)

        # 2. One prompt, seed and generator per image, so that an image is the same whatever
        # else shares the batch. (The images then agree to about 2e-6 but not bit for bit:
        # batched kernels sum in another order, so a rare 8-bit pixel value may differ by one.)
        images_of = [(jobs[i], n) for i in running for n in range(jobs[i].num_outputs)]
        if steps == 0:
            # Strength 0 (or too little for one step) asks for the input as it is: no step runs.
            images = [job.image for job, _ in images_of]
        else:
            images = self._call(pipe, first, steps, images_of, jobs, running, stopped)

        # 3. Each job's images, unless it was canceled meanwhile; its task thread encodes them.
        results: list[dict[str, Any] | BaseException] = []
        for i, job in enumerate(jobs):
            if stopped[i] or job.request.should_stop():
                results.append(JobCanceled(job.request.job_id))
                continue
            mine = [(image, job.seed + n) for image, (owner, n) in zip(images, images_of, strict=False) if owner is job]
            results.append({"images": [_encode(finish(image, job), job, seed) for image, seed in mine]})
        return results

    def _call(
        self,
        pipe: DiffusionPipeline,
        first: _Job,
        steps: int,
        images_of: list[tuple[_Job, int]],
        jobs: list[_Job],
        running: list[int],
        stopped: list[bool],
    ) -> list[Any]:
        import torch

        generators = [torch.Generator(device="cpu").manual_seed(job.seed + n) for job, n in images_of]

        # Report progress the way diffusers counts steps (a PNDM run of 20 steps makes 21
        # denoiser calls, the first a warm-up), and interrupt once every job wants to stop.
        done = 0

        def on_step(pipe: DiffusionPipeline, i: int) -> None:
            nonlocal done
            order, total = pipe.scheduler.order, pipe.num_timesteps
            if done < steps and (i == total - 1 or (i + 1 > total - steps * order and (i + 1) % order == 0)):
                done += 1
                for j in running:
                    on_progress = jobs[j].request.on_progress
                    if not stopped[j] and on_progress is not None:
                        on_progress(done, steps)
            for j in running:
                stopped[j] = stopped[j] or jobs[j].request.should_stop()
            if all(stopped[j] for j in running):
                pipe._interrupt = True  # diffusers skips the remaining steps

        def on_step_end(pipe: DiffusionPipeline, i: int, t: Any, kwargs: dict) -> dict:
            on_step(pipe, i)
            return kwargs

        # The pipeline call itself, on a pipeline of the job's scheduler if it names one.
        scheduled = with_scheduler(pipe, first.scheduler)
        arguments = {
            "prompt": [job.prompt for job, _ in images_of],
            "negative_prompt": [job.negative_prompt for job, _ in images_of],
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance_scale,
            "generator": generators,
            "output_type": "pil",
            "callback_on_step_end": on_step_end,
            # Pipelines older in style (PixArt) report steps only, and cannot be interrupted.
            "callback": lambda i, t, latents: on_step(scheduled, i),
            **task_arguments(scheduled, images_of, generators),
        }
        if "callback_on_step_end" in call_arguments(scheduled, arguments):
            del arguments["callback"]
        with self._run_lock, torch.inference_mode():
            return list(scheduled(**call_arguments(scheduled, arguments)).images)
