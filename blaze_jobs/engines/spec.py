"""The engine spec: everything the rest of Blaze Jobs knows about an engine, in one object.

Each engine module declares one ``EngineSpec`` and ``blaze_jobs.engines.SPECS`` lists them.
The API reads a spec's input model (also its OpenAPI schema), bounds and cache rules; the
worker creates the engine through it; settings, the CLI and the stack iterate over the specs.
A spec imports nothing heavy: an engine's torch or diffusers load when ``create`` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator
from pydantic_settings import NoDecode

from blaze_jobs.errors import RequestError

if TYPE_CHECKING:
    from blaze_jobs.engines.base import Engine
    from blaze_jobs.settings import Settings


def _integral(value: Any) -> Any:
    # JSON has one kind of number, and JSON Schema calls 5.0 an integer; strict mode, which
    # keeps "64" from passing as a width, would refuse 5.0 too.
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: An integer as JSON may write it: `5` or `5.0`, never `5.5` or `"5"`.
JSONInt = Annotated[int, BeforeValidator(_integral)]
#: The same or null. (`JSONInt | None` would hide the field's bounds from its JSON Schema.)
OptionalJSONInt = Annotated[int | None, BeforeValidator(_integral)]


def _comma_separated(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


#: A settings field read from the environment as a comma-separated list (``a,b``).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_separated)]


class Batching(str, Enum):
    """How an engine shares its device between jobs."""

    #: The batcher groups jobs of equal batch keys and runs each group in one ``run_batch``.
    static = "static"
    #: The engine schedules jobs itself: each goes to ``Engine.submit`` as it arrives.
    continuous = "continuous"
    #: Jobs gain nothing from sharing a call: each runs alone, on its own task thread.
    none = "none"


@dataclass(frozen=True)
class Bound:
    """An upper bound on one input field, set by the deployment: a length for text and
    lists, a value for numbers; with ``items``, the length of each item of a list."""

    model: type[BaseModel]
    field: str
    setting: str
    unit: str
    items: bool = False


class OutOfBounds(RequestError):
    """An input beyond this deployment's bounds; the API answers 422 naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ArtifactKind:
    """A kind of file an engine produces, served with this content type."""

    extension: str  # e.g. "png", without the dot
    content_type: str  # e.g. "image/png"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that needs no download: built locally on first use, then loaded from disk."""

    id: str  # e.g. "builtin:tiny-sd"
    #: Part of every cache key of the model: bump it when the builder changes, so entries
    #: made by the old weights are never served again.
    revision: str
    folder: str | None = None  # under BLAZE_MODEL_DIR; None: nothing to build
    marker: str | None = None  # the file whose presence says the folder is complete
    #: Makes the model's parts (anything with ``save_pretrained``); imports what it needs.
    build: Callable[[], Sequence[Any]] | None = None


def seeded(input: dict[str, Any]) -> bool:
    """The usual cache rule: a request is deterministic once it names its seed."""
    return input.get("seed") is not None


@dataclass(frozen=True)
class EngineSpec:
    """What Blaze Jobs needs to know about one engine."""

    #: The engine's name in requests (``"engine": "diffusion"``); also its Celery queue.
    name: str
    #: The ``input`` of a job, validated by the API; its JSON Schema is the OpenAPI one.
    input_model: type[BaseModel]
    #: The OpenAPI description of this engine's create request.
    description: str
    #: How the engine shares its device between jobs.
    batching: Batching
    #: The engine a worker runs: ``create(settings, device=, max_batch=)``, which imports
    #: the engine's heavy libraries (the API never calls it).
    create: Callable[..., Engine]
    #: The settings fields this engine adds to ``Settings`` (a pydantic model of its own).
    settings: type[BaseModel]
    #: The settings field holding the default model, and the one listing the other models
    #: a request may name (None: only the default).
    default_model_setting: str
    allowed_models_setting: str | None = None
    #: When true, a request may leave ``input`` out (it is then the model's defaults).
    input_optional: bool = False
    bounds: tuple[Bound, ...] = ()
    #: Checks that no single field's bound states (the pixels of width x height, what the
    #: job's model takes): called with the input, the settings and the job's model (the
    #: engine's default when the request names none); raises OutOfBounds.
    check: Callable[[Any, Settings, str], None] | None = None
    #: Whether a request's output is deterministic, so the cache may serve it.
    cacheable: Callable[[dict[str, Any]], bool] = seeded
    #: Inputs that never change the output: the cache key leaves them out.
    not_output: frozenset[str] = frozenset()
    artifacts: tuple[ArtifactKind, ...] = ()
    builtin_models: tuple[BuiltinModel, ...] = ()

    @property
    def queue(self) -> str:
        """The Celery queue this engine's workers consume."""
        return self.name

    def default_model(self, settings: Settings) -> str:
        return str(getattr(settings, self.default_model_setting))

    def allowed_models(self, settings: Settings) -> list[str]:
        """The models a request may name, the default first."""
        default = self.default_model(settings)
        others: list[str] = getattr(settings, self.allowed_models_setting) if self.allowed_models_setting else []
        return [default, *[m for m in others if m != default]]
