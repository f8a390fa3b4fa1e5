"""Replicate's predictions, as a view of Blaze jobs: the prediction JSON a job shows on the
Replicate-compatible routes (``api/replicate.py``) and in its webhook bodies (the webhook
worker renders those, so this lives here, not in ``api/``), and the models and versions
this deployment offers under Replicate's names.

A prediction is a Blaze job with the same id. Its model is ``blaze/<engine>``; a version
names one of the engine's allowed models, by an id derived from the two, so it is the same
on every API process and across restarts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from blaze_jobs.engines import spec_of
from blaze_jobs.jobs import job_view
from blaze_jobs.settings import ENGINES, Settings

if TYPE_CHECKING:
    from blaze_jobs.artifacts import UrlSigner

#: The owner of every model here: Replicate names a model ``owner/name``.
OWNER = "blaze"
#: The record field that marks a job made by the Replicate-compatible routes, whose webhook
#: bodies are predictions (``deliveries.event_body``).
SURFACE = "replicate"

#: Replicate's status for each Blaze status. Its client accepts only these five.
STATUS = {"queued": "starting", "running": "processing", "succeeded": "succeeded", "failed": "failed", "canceled": "canceled"}

#: The Blaze webhook events each of Replicate's ``webhook_events_filter`` values asks for.
#: Blaze jobs have their output at the end (a text job streams it, but its record holds it
#: only once it ends), so ``output`` is sent with the completed prediction; ``logs`` are the
#: job's progress reports, which the prediction's ``logs`` show.
WEBHOOK_EVENTS = {"start": ("started",), "output": ("completed",), "logs": ("progress",), "completed": ("completed",)}
#: What Replicate sends when a request names no filter: new outputs and the end.
DEFAULT_WEBHOOK_EVENTS = ("output", "completed")

#: Each engine's output, as a version's OpenAPI schema describes it. An LLM on Replicate
#: returns a list of strings its clients join (``x-cog-array-display: concatenate``), and
#: ``client.run`` with such a version gives an iterator of them, as it does for Replicate's
#: own language models; images are a list of URLs.
OUTPUT_SCHEMAS: dict[str, dict[str, Any]] = {
    "diffusion": {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"},
    "llm": {
        "type": "array",
        "items": {"type": "string"},
        "title": "Output",
        "x-cog-array-type": "iterator",
        "x-cog-array-display": "concatenate",
    },
}
#: A version's ``created_at``: a version names an (engine, model) pair of the deployment's
#: settings, not a push, so it has no creation time of its own; the epoch says so.
VERSION_CREATED_AT = "1970-01-01T00:00:00Z"


def blaze_events(replicate_events: Sequence[str] | None) -> list[str]:
    """The Blaze webhook events (``started``, ``progress``, ``completed``) for a Replicate
    ``webhook_events_filter`` (``start``, ``output``, ``logs``, ``completed``)."""
    wanted = DEFAULT_WEBHOOK_EVENTS if replicate_events is None else replicate_events
    return list(dict.fromkeys(event for name in wanted for event in WEBHOOK_EVENTS[name]))


# --- models and versions ------------------------------------------------------------------


def version_id(engine: str, model: str) -> str:
    """The version id of ``model`` on ``engine``: 64 hex digits, as Replicate's are."""
    return hashlib.sha256(f"{engine}\n{model}".encode()).hexdigest()


def resolve_version(reference: str, settings: Settings) -> tuple[str, str] | None:
    """The (engine, model) a create's ``version`` names: a version id, ``blaze/<engine>``
    (its default model) or ``blaze/<engine>:<version id>``; None for anything else."""
    name, _, wanted = reference.partition(":") if "/" in reference else ("", "", reference)
    if name:
        owner, _, engine = name.partition("/")
        if owner != OWNER or engine not in ENGINES:
            return None
        if not wanted:
            return engine, settings.default_model(engine)
        engines: tuple[str, ...] = (engine,)
    else:
        engines = ENGINES
    for engine in engines:
        for model in settings.allowed_models(engine):
            if version_id(engine, model) == wanted:
                return engine, model
    return None


def version_view(engine: str, model: str) -> dict[str, Any]:
    """A version as Replicate shows it, with the engine's input schema as Cog writes it."""
    spec = spec_of(engine)
    schema = {
        "openapi": "3.0.2",
        "info": {"title": f"{OWNER}/{engine}", "version": model, "description": spec.description},
        "paths": {},
        "components": {
            "schemas": {
                "Input": spec.input_model.model_json_schema(),
                "Output": OUTPUT_SCHEMAS.get(engine, {"type": "object", "title": "Output"}),
            }
        },
    }
    return {
        "id": version_id(engine, model),
        "created_at": VERSION_CREATED_AT,
        # Not a Cog version: these models run on Blaze workers (the client parses it, and
        # reads an unparsable one as "recent").
        "cog_version": "blaze-jobs",
        "openapi_schema": schema,
        "blaze_model": model,
    }


def model_view(engine: str, settings: Settings, *, base_url: str) -> dict[str, Any]:
    """``blaze/<engine>`` as Replicate shows a model; its latest version is the engine's
    default model."""
    spec = spec_of(engine)
    return {
        "url": f"{base_url}/v1/models/{OWNER}/{engine}",
        "owner": OWNER,
        "name": engine,
        "description": spec.description,
        "visibility": "public",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        # Required by the client; this deployment counts no runs per model.
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": version_view(engine, settings.default_model(engine)),
    }


# --- predictions --------------------------------------------------------------------------


def prediction_view(record: dict[str, str], *, base_url: str, signer: UrlSigner, blocking: bool = False) -> dict[str, Any]:
    """The prediction a job's record shows. ``blocking``: the answer to a create that waited
    (``Prefer: wait``) and saw no end, which Replicate's client reads as finished unless it
    says ``starting``, whatever the job's own status (``blaze_status`` keeps it)."""
    job = job_view(record, base_url=base_url, signer=signer)  # artifact URLs made absolute and signed
    engine, status = job["engine"], job["status"]
    replicate_status = "starting" if blocking and status in ("queued", "running") else STATUS[status]
    url = f"{base_url}/v1/predictions/{job['id']}"
    error = job["error"]["message"] if job["error"] and status == "failed" else None
    return {
        "id": job["id"],
        "model": f"{OWNER}/{engine}",
        "version": version_id(engine, job["model"]),
        "status": replicate_status,
        "input": job["input"],
        "output": _output(engine, job["output"]),
        "logs": progress_log(job["progress"]),
        "error": error,
        "metrics": _metrics(record, job),
        "created_at": _time(record.get("created_at")),
        "started_at": _time(record.get("started_at")),
        "completed_at": _time(record.get("completed_at")),
        "urls": {"get": url, "cancel": f"{url}/cancel", "stream": f"{url}/stream"},
        "source": "api",
        "data_removed": False,
        "blaze_status": status,
        "blaze_model": job["model"],
    }


def final_pieces(engine: str, output: Any, *, streamed: str) -> list[str]:
    """The ``output`` events a prediction's stream sends at its end, given its ``output`` (as
    ``prediction_view`` shows it) and the text its ``output`` events carried so far: the text
    they missed, so that all of them join to the output; each image URL; another engine's
    output as JSON."""
    if output is None:
        return []
    if engine == "llm":
        text = "".join(output)
        return [text[len(streamed) :]] if text.startswith(streamed) and len(text) > len(streamed) else []
    if isinstance(output, list) and all(isinstance(item, str) for item in output):
        return output
    return [json.dumps(output, separators=(",", ":"))]


def progress_log(progress: Any) -> str:
    """A job's progress (``{step, total}``, or its JSON) as a log line: a progress bar, as
    tqdm writes one, which Replicate's client parses into ``prediction.progress``."""
    if isinstance(progress, str):
        progress = json.loads(progress)
    if not progress or not progress.get("total"):
        return ""
    step, total = progress["step"], progress["total"]
    filled = 10 * step // total
    return f"{100 * step // total:3d}%|{'#' * filled}{' ' * (10 - filled)}| {step}/{total}\n"


def _output(engine: str, output: dict[str, Any] | None) -> Any:
    if output is None:
        return None
    if engine == "diffusion":
        return [image["url"] for image in output.get("images", [])]
    if engine == "llm":
        # One piece: the tokens a stream sent join to it, and ``"".join(output)`` is the text.
        return [output.get("text", "")]
    return output


def _metrics(record: dict[str, str], job: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if job["metrics"]["run_time_s"] is not None:
        metrics["predict_time"] = job["metrics"]["run_time_s"]
    if record.get("completed_at"):
        metrics["total_time"] = round(float(record["completed_at"]) - float(record["created_at"]), 6)
    usage = (job["output"] or {}).get("usage") if job["engine"] == "llm" else None
    if isinstance(usage, dict):
        metrics["input_token_count"] = usage.get("prompt_tokens")
        metrics["output_token_count"] = usage.get("completion_tokens")
    metrics["batch_size"] = job["metrics"]["batch_size"]
    metrics["cache_hit"] = job["metrics"]["cache_hit"]
    return metrics


def _time(value: str | None) -> str | None:
    # Replicate writes UTC with a Z.
    if not value:
        return None
    return datetime.fromtimestamp(float(value), tz=timezone.utc).isoformat().replace("+00:00", "Z")
