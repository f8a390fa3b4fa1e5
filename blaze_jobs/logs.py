"""How every Blaze Jobs process writes its log: as text lines, or (``BLAZE_LOG_FORMAT=json``)
one JSON object per line.

A line written while a job is being handled (``job_context``) carries that job's id, engine,
model and worker, whichever the format.
"""

from __future__ import annotations

import contextvars
import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from blaze_jobs.settings import Settings, get_settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: What the lines written now are about: ``job``, ``engine``, ``model``, ``worker``.
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("blaze_log_context", default={})  # noqa: B039


@contextmanager
def job_context(**fields: str | None) -> Iterator[None]:
    """Lines logged inside the block (in this thread or task) carry ``fields``, on top of
    those of any enclosing block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: str | None) -> None:
    """Add ``fields`` to the enclosing ``job_context`` (the model, once the record is read)."""
    _context.get().update({k: v for k, v in fields.items() if v is not None})


def context() -> dict[str, str]:
    return dict(_context.get())


def configure(level: str, settings: Settings | None = None) -> None:
    """Set up the root logger of a worker process."""
    settings = settings or get_settings()
    logging.basicConfig(level=level, format=TEXT_FORMAT)


def uvicorn_config(level: str, settings: Settings | None = None) -> dict[str, Any]:
    """uvicorn's logging, with the API's own loggers (``blaze_jobs.api.*``: every problem
    answered, under its id) written the same way."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["blaze_jobs.api"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config
