"""Families of diffusers text-to-image models: which pipelines belong to each, the inputs a
family does not take, and its defaults.

A model's family is known without loading it (a built-in id, the ``model_index.json`` of a
local folder or of a Hugging Face id in the local cache, or the deployment's model options),
so the API refuses an input the model does not take before any worker loads it. Imports
neither torch nor diffusers: the API reads this module.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blaze_jobs.errors import RequestError


@dataclass(frozen=True)
class Family:
    """A family of pipelines that take the same inputs."""

    name: str  # as the deployment's model options declare it: "sdxl"
    label: str  # as people say it, in refusals: "Flux"
    #: The diffusers pipeline classes of the family (text to image, image to image,
    #: inpainting), by name.
    pipelines: frozenset[str]
    #: Input fields the family's pipelines have no use for. ``image`` goes with a family that
    #: has no image-to-image pipeline, ``mask`` with one that has no inpainting pipeline.
    refuses: frozenset[str] = frozenset()
    #: Defaults of ``num_inference_steps`` and ``guidance_scale`` where the family's differ
    #: from Stable Diffusion's (20 and 7.5), taken from the family's diffusers pipeline.
    defaults: Mapping[str, Any] = field(default_factory=dict)


_NO_IMAGE = frozenset({"image", "mask", "strength"})
# Flow-matching models denoise with the one scheduler they were trained for; the names a
# request may give (diffusion_input.SCHEDULERS) are all for noise-predicting models.
_OWN_SCHEDULER = frozenset({"scheduler"})

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "sd",
            "Stable Diffusion",
            frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}),
        ),
        Family(
            "sdxl",
            "Stable Diffusion XL",
            frozenset({"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}),
            defaults={"num_inference_steps": 30, "guidance_scale": 5.0},
        ),
        Family(
            "sd3",
            "Stable Diffusion 3",
            frozenset({"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"}),
            refuses=_OWN_SCHEDULER,
            defaults={"num_inference_steps": 28, "guidance_scale": 7.0},
        ),
        Family(
            "flux",
            "Flux",
            frozenset({"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"}),
            # Flux is guidance-distilled: its pipeline reads a negative prompt only for a
            # second, "true" guidance pass that Blaze Jobs does not run.
            refuses=_OWN_SCHEDULER | {"negative_prompt"},
            defaults={"num_inference_steps": 28, "guidance_scale": 3.5},
        ),
        Family(
            "pixart",
            "PixArt",
            frozenset({"PixArtAlphaPipeline", "PixArtSigmaPipeline"}),
            refuses=_NO_IMAGE,
            defaults={"guidance_scale": 4.5},
        ),
        Family(
            "sana",
            "Sana",
            frozenset({"SanaPipeline"}),
            refuses=_NO_IMAGE | _OWN_SCHEDULER,
            defaults={"guidance_scale": 4.5},
        ),
        Family(
            "lcm",
            "Latent Consistency",
            frozenset({"LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline"}),
            # LCM distils guidance into the model and samples with its own few-step scheduler.
            refuses=_OWN_SCHEDULER | {"negative_prompt", "mask"},
            defaults={"num_inference_steps": 4, "guidance_scale": 8.5},
        ),
    )
}

#: The family of each built-in model, known without building it.
BUILTIN_FAMILIES = {"builtin:tiny-sd": "sd", "builtin:tiny-sdxl": "sdxl", "builtin:tiny-sd3": "sd3"}

_BY_PIPELINE = {pipeline: family for family in FAMILIES.values() for pipeline in family.pipelines}


def family_of_pipeline(class_name: str) -> Family | None:
    """The family a diffusers pipeline class (by name) belongs to, if any listed."""
    return _BY_PIPELINE.get(class_name)


def family_of(model: str, *, declared: str | None = None) -> Family | None:
    """The family of ``model`` without loading it: declared in the deployment's options, a
    built-in id, or read from the ``model_index.json`` of a local folder or of a Hugging Face
    id in the local cache. None: unknown until a worker loads it."""
    if declared is not None:
        return FAMILIES[declared]
    if model in BUILTIN_FAMILIES:
        return FAMILIES[BUILTIN_FAMILIES[model]]
    class_name = _pipeline_class_name(model)
    return None if class_name is None else family_of_pipeline(class_name)


def refused_field(family: Family, data: Mapping[str, Any]) -> str | None:
    """The first field of ``data`` (an input) that ``family`` does not take, if any."""
    for name in sorted(family.refuses):
        # An empty negative prompt asks for nothing, whatever the family.
        if data.get(name) not in (None, ""):
            return name
    return None


def refuse(family: Family | None, data: Mapping[str, Any]) -> None:
    """Raise RequestError naming the first field of ``data`` that ``family`` does not take."""
    name = None if family is None else refused_field(family, data)
    if family is not None and name is not None:
        raise RequestError(f"input.{name}: {family.label} models do not take {name}")


# Class names found, by model: read once per process. A miss is not kept, since the model
# may reach the Hugging Face cache later (a worker downloads it).
_class_names: dict[str, str] = {}
_class_names_lock = threading.Lock()


def _pipeline_class_name(model: str) -> str | None:
    with _class_names_lock:
        found = _class_names.get(model)
    if found is not None:
        return found
    index: str | Path | None = None
    if Path(model).is_dir():
        index = Path(model) / "model_index.json"
    elif "/" in model and not model.startswith(("/", ".")):
        index = _cached_index(model)
    if index is None:
        return None
    try:
        name = json.loads(Path(index).read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str):
        return None
    with _class_names_lock:
        _class_names[model] = name
    return name


def _cached_index(repo_id: str) -> str | None:
    # Imported here: huggingface_hub is light, but the API needs it only for Hub ids.
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except ValueError:  # not a valid repository id
        return None
    return found if isinstance(found, str) else None
