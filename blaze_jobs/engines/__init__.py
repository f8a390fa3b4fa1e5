"""Engines turn a job's input into its output on a device. Each module here declares one
``EngineSpec`` (``spec.py``); ``SPECS`` lists them, and everything else iterates over it.
Heavy libraries (torch, diffusers) are imported only when a worker creates its engine,
never by the API. ``docs/engines.md`` walks through adding one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blaze_jobs.engines import diffusion, echo, llm
from blaze_jobs.engines.spec import EngineSpec

if TYPE_CHECKING:
    from blaze_jobs.engines.base import Engine
    from blaze_jobs.settings import Settings

#: Every engine this installation runs, by name; a new engine is one line here.
SPECS: tuple[EngineSpec, ...] = (diffusion.SPEC, echo.SPEC, llm.SPEC)


def spec_of(name: str) -> EngineSpec:
    """The spec of the engine called ``name``."""
    for spec in SPECS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown engine {name!r}; known: {[s.name for s in SPECS]}")


def create_engine(name: str, settings: Settings, *, device: str | None = None, max_batch: int | None = None) -> Engine:
    """The engine a worker for ``name`` runs. ``max_batch`` bounds the sequences a continuous
    engine (llm) runs at once; static batches are bounded by the batcher."""
    return spec_of(name).create(settings, device=device, max_batch=max_batch)
