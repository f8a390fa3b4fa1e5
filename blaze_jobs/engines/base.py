"""What every engine offers the worker: batch keys, a batched run, and clean-up.

Faults are classified by where they happen, not by their type. Resolving and validating a
request's input (its defaults, its batch key, its tokens) is the request's territory:
whatever fails there fails that job alone, as ``RequestError`` (``request_territory``).
What happens on the device is the worker's: any other exception out of an engine is a
worker fault, which counts against the worker's breaker, and the job runs elsewhere.

Kept free of heavy imports (torch, diffusers) so the API and tests can import it cheaply.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from blaze_jobs.errors import BlazeError, RequestError

if TYPE_CHECKING:
    from blaze_jobs.engines.spec import EngineSpec


class OutputFuture(Future[dict[str, Any]]):
    """A future of one job's output from a continuous engine, which also says how many jobs
    ran beside it."""

    def __init__(self) -> None:
        super().__init__()
        #: Once the future resolves: the most jobs the job shared the device with.
        self.batch_size = 1


@dataclass(eq=False)
class Artifact:
    """A file an engine produced; the worker stores it and puts its URL in the job's output.

    ``render`` makes its bytes, once, on the first read of ``data``. Engines hand a batch's
    artifacts back unrendered, so that encoding (tens of ms of CPU for one 512×512 PNG) runs
    on each job's own task thread while the device thread starts the next batch.
    """

    render: Callable[[], bytes] = field(repr=False)
    content_type: str  # e.g. "image/png"
    extension: str  # e.g. "png", without the dot
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"width": 64, "height": 64, "seed": 7}

    @cached_property
    def data(self) -> bytes:
        """The file's bytes."""
        return self.render()

    @property
    def size(self) -> int:
        """The artifact's length in bytes."""
        return len(self.data)


def read_int(data: dict[str, Any], field: str, default: int, *, minimum: int) -> int:
    """The integer ``field`` of a request's input (``default`` when missing or None)."""
    value = data.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(f"{field}: must be an integer of at least {minimum}, got {value!r}")
    return value


def read_seed(data: dict[str, Any]) -> int:
    """The request's seed, or a fresh random one: the engine resolves it once, so a retry
    reuses it and the output can name it."""
    return secrets.randbits(32) if data.get("seed") is None else read_int(data, "seed", 0, minimum=0)


@contextmanager
def request_territory(what: str) -> Iterator[None]:
    """Code that reads a request's input: anything it raises (a ``RecursionError`` on a
    deeply nested input, a ``ValueError`` from a tokenizer) is the request's fault. Errors
    Blaze Jobs raises on purpose (a ``WorkerFault`` from a model load) pass unchanged."""
    try:
        yield
    except BlazeError:
        raise
    except Exception as exc:
        raise RequestError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _never() -> bool:
    return False


@dataclass
class EngineRequest:
    """One job's work as an engine sees it: the model, the validated input and two hooks."""

    job_id: str
    model: str  # e.g. "builtin:tiny-sd", a local path or a Hugging Face id
    input: dict[str, Any]  # validated by the API; optional keys may be missing or None
    should_stop: Callable[[], bool] = _never  # polled at each step; True ends the job with JobCanceled
    on_progress: Callable[[int, int], None] | None = None  # called with (step, total)
    on_delta: Callable[[str], None] | None = None  # text engines: each new piece of output text, in order
    on_partial: Callable[[dict[str, Any]], None] | None = None  # text engines: before each piece, the output so far but its text
    #: The job's tenant, where the worker knows it: an input artifact must be one of its own.
    tenant: str | None = None
    #: What was fetched for the request, by input field name (``"image"``, ``"mask"``: PIL
    #: images), by ``Engine.fetch_inputs`` before the request reaches the device.
    fetched: dict[str, Any] = field(default_factory=dict)


class Engine:
    """The base of the engines (diffusion, llm, echo) a worker runs jobs with."""

    #: What the rest of Blaze Jobs knows of the engine: its name, and how it batches
    #: (``spec.batching``), which the batcher follows.
    spec: ClassVar[EngineSpec]

    @property
    def name(self) -> str:
        return self.spec.name

    def fetch_inputs(self, request: EngineRequest) -> None:
        """Fetch what the request's input names from elsewhere (an image by URL) into
        ``request.fetched``. The batcher calls it in the job's task thread and in request
        territory, before ``batch_key``, so a slow fetch never holds the device and a bad
        one fails only its job."""

    def batch_key(self, request: EngineRequest) -> tuple:
        """Requests whose keys are equal may run together in one ``run_batch`` call (the
        batcher calls it in request territory)."""
        # Safe default for engines that cannot batch: every request is alone.
        return (self.name, request.job_id)

    def run_batch(self, requests: list[EngineRequest]) -> list[dict[str, Any] | BaseException]:
        """Run ``requests`` together and return one result per request, in order.

        A result is the request's output (a JSON-able dict whose values may include
        Artifacts, also nested in lists or dicts) or the exception that failed only that
        request; an exception raised out of ``run_batch`` fails the whole batch. An engine
        resolves each request's input in ``request_territory``; any other exception is a
        worker fault.
        """
        raise NotImplementedError

    def submit(self, request: EngineRequest) -> OutputFuture:
        """A continuous engine (``Batching.continuous``) takes each job here as it arrives and
        schedules it itself; the future resolves to the job's output or its error."""
        raise NotImplementedError(f"the {self.name} engine batches {self.spec.batching.value}, not continuously")

    def run(self, request: EngineRequest) -> dict[str, Any]:
        """Run one request alone and return its output, raising its error if it failed."""
        (result,) = self.run_batch([request])
        if isinstance(result, BaseException):
            raise result
        return result

    def prepare(self, model: str) -> None:
        """Load ``model`` ahead of its first job, so a worker starts warm."""

    def close(self) -> None:
        """Free what the engine holds (models, device memory)."""
