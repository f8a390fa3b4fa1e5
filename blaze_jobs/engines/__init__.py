"""Engines turn a job's input into its output on a device. Heavy libraries (torch,
diffusers) are imported only when a worker creates its engine, never by the API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blaze_jobs.settings import Settings

if TYPE_CHECKING:
    from blaze_jobs.engines.base import Engine


def create_engine(name: str, settings: Settings, *, device: str | None = None, max_batch: int | None = None) -> "Engine":
    """The engine a worker for ``name`` runs. ``max_batch`` bounds the sequences a continuous
    engine (llm) runs at once; static batches are bounded by the batcher."""
    if name == "diffusion":
        from blaze_jobs.engines.diffusion import DiffusionEngine

        return DiffusionEngine(
            model_dir=settings.model_dir, device=device or settings.device, max_loaded_models=settings.max_loaded_models
        )
    if name == "echo":
        from blaze_jobs.engines.echo import EchoEngine

        return EchoEngine()
    if name == "llm":
        from blaze_jobs.engines.llm import LLMEngine

        return LLMEngine(
            model_dir=settings.model_dir,
            device=device or settings.device,
            max_batch=max_batch or settings.max_batch,
            max_loaded_models=settings.max_loaded_models,
        )
    raise ValueError(f"unknown engine {name!r}")
