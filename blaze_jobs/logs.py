"""How every Blaze Jobs process writes its log: as text lines, or (``BLAZE_LOG_FORMAT=json``)
one JSON object per line, whichever logger wrote it (ours, uvicorn's or Celery's).

A line written while a job is being handled (``job_context``) carries that job's id, engine,
model and worker, whichever the format: a text line ends with ``[job=… engine=… …]``, a JSON
object has them as fields. ``docs/logging.md`` lists the fields.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import orjson

from blaze_jobs.settings import Settings, get_settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The fields a job's lines carry, in the order a text line shows them.
CONTEXT_FIELDS = ("job", "engine", "model", "worker")


class _Block(dict[str, str]):
    """The fields of one ``job_context`` block (its own and those of the blocks around it),
    and the block around it."""

    __slots__ = ("outer",)

    def __init__(self, fields: Mapping[str, str], outer: Mapping[str, str]) -> None:
        super().__init__(fields)
        self.outer = outer


_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})
#: What the lines written now are about (``CONTEXT_FIELDS``), per thread or task.
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("blaze_log_context", default=_NO_CONTEXT)

#: A LogRecord's own attributes: every other one was passed with ``extra=``. uvicorn's
#: ``color_message`` is its message again, with terminal colours.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


@contextmanager
def job_context(**fields: str | None) -> Iterator[None]:
    """Lines logged inside the block (in this thread or task) carry ``fields``, on top of
    those of any enclosing block. Leaving the block, however it is left, takes them away."""
    outer = _context.get()
    token = _context.set(_Block({**outer, **{k: v for k, v in fields.items() if v is not None}}, outer))
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: str | None) -> None:
    """Add ``fields`` to the enclosing ``job_context`` (the model, once the record is read),
    and to the blocks around it about the same job (Celery's, whose line that the task ended
    comes after the worker's block has closed), until those blocks end. Outside any block it
    does nothing: a thread running one job after another carries nothing into the next."""
    block = _context.get()
    if not isinstance(block, _Block):
        return
    known = {k: v for k, v in fields.items() if v is not None}
    job = block.get("job")
    block.update(known)
    outer = block.outer
    while job is not None and isinstance(outer, _Block) and outer.get("job") == job:
        outer.update(known)
        outer = outer.outer


def context() -> dict[str, str]:
    return dict(_context.get())


def _message(record: logging.LogRecord) -> str:
    """The record's message, or, when its arguments do not fit it, a message saying so: a
    bad call still makes one line, not logging's traceback on stderr."""
    try:
        return record.getMessage()
    except Exception as error:
        why = f"{type(error).__name__}: {_as_str(error)}"
        return f"{_shown(record.msg, repr)} % {_shown(record.args, repr)} (unformattable: {why})"


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with ``[job=… engine=… model=… worker=…]`` after a job's lines."""

    def __init__(self, fmt: str = TEXT_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        try:
            return super().format(record)
        except Exception:
            # Arguments that do not fit the message: a copy with the message as it can be shown.
            return super().format(logging.makeLogRecord({**record.__dict__, "msg": _message(record), "args": None}))

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        # The job's fields, or those a record names itself (Celery's "Task … received").
        fields = {**{k: str(record.__dict__[k]) for k in CONTEXT_FIELDS if k in record.__dict__}, **_context.get()}
        if not fields:
            return line
        shown = [f"{name}={fields[name]}" for name in CONTEXT_FIELDS if name in fields]
        shown += [f"{name}={value}" for name, value in fields.items() if name not in CONTEXT_FIELDS]
        return f"{line} [{' '.join(shown)}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``ts`` (UTC, milliseconds), ``level``,
    ``logger``, ``message``, ``process`` (pid), ``thread`` (name), the job's fields while a
    ``job_context`` is active, ``exc`` and ``stack`` when there are any, and every ``extra=``
    field (those JSON cannot hold as they are, as their ``str``). It never raises."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception as error:
            # Whatever went wrong, the record is still one line a JSON pipeline can read.
            return _dumps(
                {
                    "level": record.levelname,
                    "logger": record.name,
                    "message": _shown(record.msg, repr),
                    "format_error": f"{type(error).__name__}: {_as_str(error)}",
                }
            )

    def _format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
            "process": record.process,
            "thread": record.threadName,
        }
        entry.update(_context.get())
        if record.exc_info:
            # Cached on the record, as logging.Formatter does, for any other handler.
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # Celery's ``data`` is its message's arguments again, with the task's arguments (a
        # prompt's summary) that its text lines never show.
        celery = record.name.startswith("celery")
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and name not in entry and not (celery and name == "data"):
                entry[name] = value
        return _dumps(entry)


def _shown(value: object, *ways: Any) -> str:
    for show in ways:
        try:
            return str(show(value))
        except Exception:  # noqa: S112 (a value that cannot be shown one way may be the other)
            continue
    return f"<unprintable {type(value).__name__}>"


def _as_str(value: object) -> str:
    return _shown(value, str, repr)


_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def _dumps(entry: dict[str, Any]) -> str:
    try:
        return orjson.dumps(entry, default=_as_str, option=_JSON_OPTIONS).decode()
    except TypeError:
        # Something orjson refuses even through ``default`` (an integer past 64 bits, a
        # cycle): that field becomes its repr, the others stay as they are.
        safe: dict[str, Any] = {}
        for name, value in entry.items():
            try:
                orjson.dumps(value, default=_as_str, option=_JSON_OPTIONS)
                safe[name] = value
            except TypeError:
                safe[name] = _shown(value, repr)
        return orjson.dumps(safe, default=_as_str, option=_JSON_OPTIONS).decode()


def formatter(settings: Settings | None = None) -> logging.Formatter:
    """The formatter ``BLAZE_LOG_FORMAT`` names."""
    settings = settings or get_settings()
    return JsonFormatter() if settings.log_format == "json" else TextFormatter()


def configure(level: str, settings: Settings | None = None) -> None:
    """Set up the logging of a worker process: the root logger writes every record (ours,
    Celery's, any library's) to stderr in ``BLAZE_LOG_FORMAT``, and Celery is told to set up
    none of its own (``setup_logging``), so its worker and task loggers write the same way."""
    settings = settings or get_settings()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(settings))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # Warnings (Celery's about running as root, a library's deprecation) are lines like any other.
    logging.captureWarnings(True)
    handler.addFilter(_connect_celery(json=settings.log_format == "json"))


#: The job context each task thread set in ``task_prerun``, reset in ``task_postrun``.
_task_tokens = threading.local()


def _connect_celery(*, json: bool) -> logging.Filter:
    """Connect what keeps Celery's lines in this process's format and about their jobs;
    returns the filter that names the job on a "Task … received" line."""
    from celery import signals

    from blaze_jobs.broker import task_name
    from blaze_jobs.events import DELIVER_TASK
    from blaze_jobs.settings import ENGINES

    engines = {task_name(engine): engine for engine in ENGINES}
    celery_log = logging.getLogger("celery.apps.worker")
    #: ``worker``: this worker's name, once Celery has it.
    this_worker: dict[str, str] = {}

    def keep_ours(**_: object) -> None:
        """Connected, it tells Celery not to touch the logging set up here."""

    def before_start(*, sender: str, instance: Any, **_: object) -> None:
        this_worker["worker"] = sender
        # Celery prints its start-up banner straight to stdout: as JSON, it is one record.
        if json:
            instance.quiet = True

    def after_setup(*, instance: Any, **_: object) -> None:
        if json:
            celery_log.info("%s", instance.startup_info(artlines=False).strip())
        # What Celery does when it sets logging up itself: anything a library prints is a
        # record too (WARNING, ``celery.redirected``), so a JSON log stays all JSON.
        if instance.redirect_stdouts:
            instance.app.log.redirect_stdouts(instance.redirect_stdouts_level)

    def task_started(*, task_id: str, task: Any, args: Any = (), kwargs: Any = None, **_: object) -> None:
        # Celery's own lines about a task ("Task … succeeded") come from its thread between
        # these two signals. A job's task id is its job id; a delivery names its job first.
        fields: dict[str, Any] = {}
        if task.name in engines:
            fields = {"job": task_id, "engine": engines[task.name]}
        elif task.name == DELIVER_TASK:
            fields = {"job": args[0] if args else (kwargs or {}).get("job_id")}
        fields["worker"] = task.request.hostname
        # The thread's context starts afresh: nothing from the job this thread ran before.
        _task_tokens.token = _context.set(_Block({k: str(v) for k, v in fields.items() if v is not None}, _NO_CONTEXT))

    def task_ended(**_: object) -> None:
        token = getattr(_task_tokens, "token", None)
        _task_tokens.token = None
        if token is not None:
            _context.reset(token)

    class ReceivedJob(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            # Celery's "Task … received" is written by the consumer's thread, outside any
            # task; the task it describes (its ``data``) names the job.
            data = getattr(record, "data", None)
            if isinstance(data, dict) and data.get("name") in engines and "job" not in _context.get():
                record.__dict__.update(job=str(data.get("id")), engine=engines[data["name"]], **this_worker)
            return True

    for signal, receiver in (
        (signals.setup_logging, keep_ours),
        (signals.celeryd_init, before_start),
        (signals.celeryd_after_setup, after_setup),
        (signals.task_prerun, task_started),
        (signals.task_postrun, task_ended),
    ):
        signal.connect(receiver, weak=False, dispatch_uid=f"blaze_jobs.logs.{receiver.__name__}")
    return ReceivedJob()


def uvicorn_config(level: str, settings: Settings | None = None) -> dict[str, Any]:
    """uvicorn's logging in ``BLAZE_LOG_FORMAT``, with the API's own loggers (``blaze_jobs.*``:
    every problem answered, under its id) written the same way, and any other library's
    warnings too."""
    from uvicorn.config import LOGGING_CONFIG

    settings = settings or get_settings()
    config = copy.deepcopy(LOGGING_CONFIG)
    if settings.log_format == "json":
        config["formatters"] = {name: {"()": f"{__name__}.JsonFormatter"} for name in config["formatters"]}
    config["loggers"]["blaze_jobs"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    # Other libraries' lines once went to logging's last resort (bare text, warnings and up).
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config
