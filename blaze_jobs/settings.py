"""One settings object, read from ``BLAZE_*`` environment variables by the API, the workers,
the CLI and ``celeryconfig.py`` alike."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENGINES = ("diffusion", "echo")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLAZE_", extra="ignore")

    # --- where things are -------------------------------------------------------------
    #: Redis serves as Celery broker and holds job records, artifacts and (later) the cache.
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Every key Blaze Jobs writes, Celery's queues included, starts with this prefix, so
    #: several deployments (or test runs) can share one Redis database.
    redis_prefix: str = "blaze:"
    #: Where clients (the CLI, the demo) reach the API.
    api_url: str = "http://127.0.0.1:8000"
    #: Built-in models are built here on first use and loaded from here afterwards.
    model_dir: Path = Path.home() / ".cache" / "blaze-jobs" / "models"
    #: The API's address as clients reach it, for the URLs it hands out; when empty, the
    #: address each request came in on.
    public_url: str = ""
    #: Store artifacts as files under this directory (shared by every host) instead of Redis.
    artifact_dir: Path | None = None

    # --- jobs ---------------------------------------------------------------------------
    #: How long a job record and its artifacts stay readable after creation: one day is
    #: long enough for any client to collect a result and short enough to bound Redis memory.
    job_ttl_s: int = 86_400
    #: Largest page ``GET /v1/jobs`` returns.
    list_limit_max: int = 200
    #: How long the API waits for Redis before it answers 503 instead of hanging the client.
    redis_timeout_s: float = 2.0

    # --- engines ------------------------------------------------------------------------
    diffusion_model: str = "builtin:tiny-sd"
    #: Models a request may name besides ``diffusion_model`` (comma-separated ids or paths).
    #: A model not listed is refused at submission, so one request cannot make a worker
    #: load arbitrary weights.
    diffusion_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    echo_model: str = "builtin:echo"
    device: str = "cpu"

    # Bounds on diffusion input. A 1024x1024 image is the largest common SD size; 150 steps
    # is beyond any scheduler's useful range; 8 outputs keep one job from hogging a device.
    max_width: int = 1024
    max_height: int = 1024
    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_outputs: int = 8
    #: CLIP reads 77 tokens; 2,000 characters is far beyond that yet bounds request size.
    max_prompt_chars: int = 2_000
    #: The echo engine sleeps at most this long (it exists for tests and benchmarks).
    max_sleep_ms: int = 60_000

    # --- workers: batching, faults, leases ------------------------------------------------
    #: Most jobs one batch holds; a worker runs this many task threads so it can fill one.
    max_batch: int = 8
    #: How long the oldest job of a partial batch waits for companions: 50 ms is noise next
    #: to a denoising run and enough for a saturated queue to deliver a full batch.
    max_wait_ms: float = 50.0
    #: A batch still running after this long is a worker fault (a hung device).
    batch_timeout_s: float = 600.0
    #: Times a job may start before worker faults fail it for good.
    max_attempts: int = 3
    #: Worker faults in a row that open a worker's breaker.
    breaker_failures: int = 3
    #: First cool-down of an open breaker; it doubles on each failed probe, up to the max.
    breaker_cooldown_s: float = 30.0
    breaker_max_cooldown_s: float = 600.0
    #: A running job's lease: its worker renews it every third of this; when a worker dies,
    #: any live worker hands the job to the queue again once the lease has run out.
    lease_s: float = 30.0
    #: Most models one worker keeps loaded (least recently used leave first).
    max_loaded_models: int = 2

    # --- cache --------------------------------------------------------------------------
    #: How long a deterministic result is reused (it also keeps its images alive).
    cache_ttl_s: int = 3_600
    #: Bound on L2 entries in Redis; the oldest are dropped first.
    cache_max_entries: int = 10_000
    #: Entries of each process's in-memory L1.
    cache_local_entries: int = 256
    #: Revisions of models given by path or id (JSON object), so a new revision misses the cache.
    model_revisions: dict[str, str] = Field(default_factory=dict)

    # --- Celery -------------------------------------------------------------------------
    #: Seconds before Redis hands an unacknowledged job to another worker. It must exceed
    #: the longest job plus its queue wait, or a long job would run twice: 12 hours.
    visibility_timeout_s: int = 43_200
    #: ``user:password`` for Flower's login; empty leaves Flower open (local use only).
    flower_basic_auth: str = ""

    @field_validator("diffusion_models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def allowed_models(self, engine: str) -> list[str]:
        """The models a request for ``engine`` may name, the default first."""
        if engine == "diffusion":
            return [self.diffusion_model, *[m for m in self.diffusion_models if m != self.diffusion_model]]
        return [self.default_model(engine)]

    def default_model(self, engine: str) -> str:
        return {"diffusion": self.diffusion_model, "echo": self.echo_model}[engine]

    def key(self, *parts: str) -> str:
        """A Redis key under this deployment's prefix."""
        return self.redis_prefix + ":".join(parts)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
