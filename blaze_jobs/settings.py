"""One settings object, read from ``BLAZE_*`` environment variables by the API, the workers,
the CLI and ``blaze_jobs/celeryconfig.py`` alike."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from blaze_jobs.engines import SPECS, spec_of
from blaze_jobs.engines.diffusion import DiffusionSettings
from blaze_jobs.engines.diffusion_pipelines import DiffusionMemorySettings
from blaze_jobs.engines.echo import EchoSettings
from blaze_jobs.engines.llm import LLMSettings

#: The registered engines' names (``blaze_jobs.engines.SPECS``).
ENGINES = tuple(spec.name for spec in SPECS)


# Each engine's settings (its models and input bounds) live in its own module and join the
# one settings object as a base class. The bases are written out rather than computed from
# SPECS so that a type checker sees every field; tests/test_engine_specs.py fails when an
# engine's settings are missing here.
class Settings(DiffusionSettings, DiffusionMemorySettings, EchoSettings, LLMSettings, BaseSettings):
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
    #: Addresses (or networks) of reverse proxies whose ``X-Forwarded-For`` and
    #: ``X-Forwarded-Proto`` the API believes (comma-separated). Empty: none, so no client
    #: can claim another address or scheme (uvicorn alone would trust 127.0.0.1).
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
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
    #: Redis connections one API process opens. A request holds one for a round trip
    #: (well under a millisecond), so 64 keep Redis busy; a burst beyond that waits its
    #: turn in the pool rather than opening more (long-polls and event streams hold none).
    redis_max_connections: int = 64
    #: How long a request waits for a pooled connection before the API answers 503 busy:
    #: a burst of hundreds of creates drains in well under a second.
    redis_pool_wait_s: float = 5.0

    # --- engines ------------------------------------------------------------------------
    # Each engine's models and input bounds: in its module (``DiffusionSettings`` …).
    #: The device workers run on by default: ``cpu``, ``cuda``, ``cuda:0`` …
    device: str = "cpu"

    # Bounds on every request, checked before anything is stored.
    #: A body is read whole into memory and parsed before any other check: 1 MiB holds the
    #: largest input allowed below even with every character written as a \u escape.
    max_body_bytes: int = 1_048_576
    #: A job's input as stored: 256 KiB is above the largest text input the bounds below
    #: allow (16,000 characters at 12 bytes each, as stored) and bounds what one echo job
    #: costs Redis (a 10 MB one cost about 60 MB).
    max_input_bytes: int = 262_144
    #: Nesting of a job's input: no engine reads deeper than 3 levels (chat messages); 32
    #: leaves room for echo's free-form fields and stays far below the depth at which
    #: orjson (255), Lua's cjson (1,000) and Python's recursion limit (1,000) give up.
    max_input_depth: int = 32

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
    #: Times a worker hands a job that faulted on it to a live peer's inbox before it runs
    #: the job again itself: the peer runs it at the first pass; the bound keeps one message
    #: from cycling should peers keep handing it back (their breakers opening meanwhile).
    fault_handbacks: int = 5
    #: A running job's lease: its worker renews it every third of this; when a worker dies,
    #: any live worker hands the job to the queue again once the lease has run out.
    lease_s: float = 30.0
    #: torch's CPU threads in a worker; 0 keeps torch's default (one per core). On a CPU that
    #: the worker shares with the API or Redis, fewer threads than cores avoids threads that
    #: spin waiting for a core (measured 10x slower steps on 2 busy cores).
    torch_threads: int = 0
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

    # --- results pushed: long-poll, events, webhooks ------------------------------------
    #: Longest ``?wait=`` (and ``Prefer: wait=``) one request may hold: 60 s stays under the
    #: idle timeout of common proxies and load balancers.
    max_wait_s: float = 60.0
    #: Long-polls and event streams one API process serves at once (more are a 503 busy).
    #: A waiter holds no Redis connection, only its socket and a few KB: the API raises its
    #: open-file limit to fit, as far as the hard limit (``ulimit -Hn``) allows.
    max_waiters: int = 10_000
    #: A running job reports progress at most this often, in seconds; 0 turns progress off.
    progress_interval_s: float = 0.5
    #: The ``whsec_`` secret the default tenant's webhooks are signed with (it predates
    #: tenants; it cannot be rotated over HTTP: change it here). Every other tenant, and the
    #: default one when this is empty, has a secret generated on first use and kept in Redis,
    #: so every API process and webhook worker shares it, rotated by
    #: ``POST /v1/webhooks/secret/rotate``.
    webhook_secret: str = ""
    #: Deliver to loopback, private, link-local and metadata addresses. For local development
    #: and tests only: otherwise a webhook could probe the deployment's own network.
    webhook_allow_private: bool = False
    #: Seconds before each retry of a failed delivery (comma-separated), each drawn within
    #: ±20 % so retries of many jobs spread out: ten retries over about 23.7 hours.
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 28800.0]
    )
    #: How long a receiver has to answer one delivery, all told (connecting, sending the
    #: body, the answer's headers): a receiver that trickles its answer is cut off here too.
    webhook_timeout_s: float = 10.0
    #: A delivery in flight is known in Redis with a deadline: the receiver's timeout plus
    #: this margin, for DNS, recording the attempt and clocks that differ between hosts. A
    #: live webhook worker sends one past its deadline again (its worker died mid-attempt),
    #: so it waits seconds, not the visibility timeout.
    webhook_attempt_margin_s: float = 5.0
    #: Deliveries one webhook worker sends at once: threads, since the work is waiting.
    webhook_concurrency: int = 16
    # --- Tenants, keys and limits (docs/security.md) -----------------------------------
    #: ``on``: every ``/v1`` request needs ``Authorization: Bearer <API key>``. ``off``: no
    #: key is asked for and every request is an admin of ``BLAZE_DEFAULT_TENANT``, for a
    #: private single-user deployment only (the API logs a warning at start).
    auth: Literal["on", "off"] = "on"
    #: A bootstrap admin credential: a Bearer equal to it is an admin key of
    #: ``BLAZE_DEFAULT_TENANT``, so a fresh deployment can make its first keys over HTTP.
    #: Empty: only keys stored in Redis (``blaze keys create``) are accepted.
    admin_token: str = ""
    #: The tenant of ``BLAZE_ADMIN_TOKEN``, of every request with auth off, and of job records
    #: written before jobs had tenants.
    default_tenant: str = "default"
    #: How long an API process trusts a key it looked up, in seconds: a revoked key stops
    #: working within this, and a request costs no Redis round trip for its key meanwhile.
    key_cache_s: float = 2.0
    #: A key's request rate when it was made without ``--rate`` (``limits`` notation, moving
    #: window); empty: such keys are not rate limited. 20 requests/s per key by default.
    default_rate: str = "1200/minute"
    #: A tenant's jobs queued plus running, at most, for keys made without ``--max-jobs``;
    #: 0: no quota.
    default_max_jobs: int = 1000
    #: Messages one engine's queue holds at most before creates answer 503: a bound on the
    #: memory a flood takes (about 2 KB a job with its record), well under any Redis size.
    queue_max: int = 100_000
    #: ``tenant``: a cache entry serves only the tenant whose job made it, so a hit never tells
    #: one tenant what another asked for. ``global``: one cache for the whole deployment.
    cache_scope: Literal["tenant", "global"] = "tenant"
    #: How long an ``Idempotency-Key`` names the job it created, in seconds (24 h, the IETF
    #: draft's suggestion).
    idempotency_ttl_s: int = 86_400
    #: After a webhook secret rotation, deliveries carry signatures of both the old and the new
    #: secret for this long (seconds), so receivers switch without losing an event.
    webhook_secret_grace_s: int = 86_400
    #: Entries the audit trail keeps (key creation and revocation, secret rotation, cancels).
    audit_max_entries: int = 100_000
    #: The key artifact URLs are signed with. Empty: one is generated on first use and kept in
    #: Redis, so every API process and webhook worker signs and checks the same way.
    artifact_url_secret: str = ""

    # --- compatible surfaces: Replicate predictions, OpenAI images, chat, files, batches -----
    #: Longest an OpenAI-style images or (non-streamed) chat request waits for its job, in
    #: seconds: those clients expect the result in the answer, and wait 600 s by default. Past
    #: it the error names the job, which goes on and can be read at ``/v1/jobs/{id}``.
    openai_wait_s: float = 300.0
    #: Most request lines in one batch file (OpenAI's own bound).
    batch_max_requests: int = 50_000
    #: Largest file ``POST /v1/files`` accepts, in bytes: a file is held in memory while it is
    #: read and kept in Redis, so this is far below OpenAI's 200 MB.
    file_max_bytes: int = 104_857_600
    #: How long an uploaded file, and a batch's output and error files, are kept (seconds).
    file_ttl_s: int = 604_800
    #: Bytes of live files (uploads and batch output and error files) one tenant may keep:
    #: files live in Redis, which evicts nothing, so one tenant's uploads must not fill it.
    #: An upload past it is refused (413); a batch's output is kept though it passes it.
    file_quota_bytes: int = 1_073_741_824
    #: Longest a batch create waits for another's to end, in seconds (one batch's jobs are
    #: admitted and stored at a time, deployment-wide); past it the answer is a 503 with
    #: Retry-After, which the OpenAI client retries.
    batch_create_wait_s: float = 30.0

    #: An event stream sends a keep-alive comment this often, so that proxies with an idle
    #: timeout (often 30-60 s) keep it open and clients that went away are found.
    event_keep_alive_s: float = 15.0
    #: Longest single ``XREAD`` block of the API's event reader: a bound on how long a dead
    #: Redis connection goes unnoticed by long-polls and event streams.
    event_read_block_s: float = 15.0
    #: Events the reader takes per job stream and read; a stream with more is read on at once.
    event_read_count: int = 100
    #: How long a webhook URL's host may take to resolve when a job is created (the create
    #: answers a 422 after it, rather than holding the client).
    webhook_dns_timeout_s: float = 5.0
    #: How often a first delivery looks whether the job's earlier events have had their first
    #: attempt (events reach a receiver in order): 5 ms is below any receiver's round trip.
    webhook_order_poll_s: float = 0.005
    #: How long past the receiver's timeout a delivery waits for the job's earlier ones at
    #: most, so one lost with a dying worker cannot hold back the ones after it for long.
    webhook_order_grace_s: float = 5.0
    #: Each retry's delay is drawn within this share either side of its scheduled value, so
    #: the retries of many jobs failing together spread out.
    webhook_retry_jitter: float = 0.2
    #: The longest ``Retry-After`` honoured: a day, the reach of the default schedule.
    webhook_retry_after_max_s: float = 86_400.0
    #: Longest a webhook worker sleeps before it looks for due retries again. It wakes sooner
    #: for the next one it knows of, and at once when it schedules one itself.
    webhook_retry_poll_s: float = 1.0
    #: How often a worker reads the status of the jobs it runs, to see cancels: one pipelined
    #: read for all of them, rather than one per job per denoising step on the device thread.
    cancel_poll_s: float = 0.1
    #: Entries a job's event stream keeps beyond what its attempts can make (see
    #: ``events.stream_maxlen``): a cancel, a birth already ended, hand-backs counting no attempt.
    event_stream_margin: int = 16
    #: Retries of a worker's Redis command, with back-off at most a second apart, before it gives
    #: up on it: about a minute, so a worker rides out a Redis restart or a full Redis instead of
    #: failing the job it was recording.
    worker_redis_retries: int = 60
    #: A worker publishes the task events Flower shows this long after the first one waiting,
    #: so those of a short job (received, started, succeeded), or of every job a busy worker
    #: ran meanwhile, are one Redis PUBLISH, not one each (``blaze_jobs.task_events``).
    task_events_flush_s: float = 0.25

    # --- watching: metrics and logs -----------------------------------------------------
    #: Prometheus metrics at the API's ``/metrics`` (a worker serves its own on
    #: ``--metrics-port``). Off, nothing is recorded and ``/metrics`` answers 404.
    metrics: bool = True
    #: When set, the API's ``/metrics`` asks for ``Authorization: Bearer <this>`` (Prometheus:
    #: ``authorization: {credentials_file: ...}``); empty, it answers anyone, as ``/healthz`` does.
    metrics_token: str = ""
    #: ``text``: one human line per record; ``json``: one JSON object per line, with the job
    #: id, engine, model and worker on every line about a job.
    log_format: Literal["text", "json"] = "text"

    # --- Celery -------------------------------------------------------------------------
    #: Seconds before Redis hands a delivered but unacknowledged message to another worker.
    #: A message lost in flight (its worker's connection died between taking it and starting
    #: it) comes back after this. Redelivering the message of a job that is still running is
    #: harmless: the job record says it is running and the duplicate is dropped. Running
    #: jobs whose worker died are leases' business (``BLAZE_LEASE_S``), not this.
    visibility_timeout_s: int = 300
    #: ``user:password`` for Flower's login; empty leaves Flower open (local use only).
    flower_basic_auth: str = ""

    @field_validator("webhook_retry_schedule", "trusted_proxies", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def allowed_models(self, engine: str) -> list[str]:
        """The models a request for ``engine`` may name, the default first."""
        return spec_of(engine).allowed_models(self)

    def default_model(self, engine: str) -> str:
        return spec_of(engine).default_model(self)

    def key(self, *parts: str) -> str:
        """A Redis key under this deployment's prefix."""
        return self.redis_prefix + ":".join(parts)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
