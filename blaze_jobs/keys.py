"""Every Redis key Blaze Jobs writes, named in one place, under the deployment's prefix.

``SCHEMA`` is the table of them (pattern, Redis type, TTL, writers); ``docs/redis.md`` carries
the same table, with why the layout is what it is (a test holds the two together). The Lua
scripts (``blaze_jobs/lua/``) take every key they touch in ``KEYS``, built here.
"""

from __future__ import annotations

from dataclasses import dataclass

from blaze_jobs.jobs import JobStatus

#: The queue webhook deliveries go to (a Celery queue, so a Redis list under the prefix).
WEBHOOK_QUEUE = "webhooks"


@dataclass(frozen=True)
class KeyInfo:
    """One row of the schema: the key's pattern, Redis type, TTL and writers."""

    pattern: str
    type: str
    ttl: str
    writers: str


#: What bounds a tenant's index: its entries older than job_ttl_s are dropped.
TENANT_INDEX_TTL = "none; entries older than job_ttl_s trimmed by the reaper once a minute and on list"

#: The schema, by the name of the ``Keys`` method (or attribute) that builds the key.
SCHEMA: dict[str, KeyInfo] = {
    "job": KeyInfo("job:<id>", "hash", "job_ttl_s", "API (create, cancel), worker (take, end), reaper"),
    "status": KeyInfo(
        "idx:status:<queued or running>",
        "zset",
        "none; entries older than job_ttl_s trimmed by the reaper",
        "every status change (Lua)",
    ),
    "lease": KeyInfo("lease:<id>", "string (worker:attempt)", "lease_s", "worker (take, renew, release)"),
    "stream": KeyInfo("job-stream:<id>", "stream", "the job's", "every job event (Lua)"),
    "deliveries": KeyInfo("job-deliveries:<id>", "hash", "the job's", "events with a webhook (Lua), webhook worker, API"),
    "webhook_order": KeyInfo("job-webhook-order:<id>", "zset", "the job's", "events with a webhook (Lua), webhook worker"),
    "queue": KeyInfo("<queue>", "list (kombu messages)", "none", "API, worker, reaper, Lua; kombu pops"),
    "inboxes": KeyInfo("inboxes", "set (inbox queue names)", "none", "worker (hand-over), reaper (drains a dead worker's)"),
    "unacked": KeyInfo("unacked", "hash (kombu's)", "none", "kombu; the reaper only reads it"),
    "worker": KeyInfo("worker:<name>", "string (JSON state)", "three beats", "worker heartbeat"),
    "workers": KeyInfo("workers", "zset", "none; entries older than a day trimmed", "worker heartbeat"),
    "reaper": KeyInfo("reaper", "string (holder)", "lease_s", "the elected worker"),
    "webhook_retries": KeyInfo("webhook-retries", "zset", "none", "webhook worker"),
    "cache": KeyInfo("cache:<key>", "string (JSON output)", "cache_ttl_s", "worker"),
    "cache_index": KeyInfo("cache-index", "zset", "none; bounded by cache_max_entries", "worker"),
    "artifact": KeyInfo("artifact:<key>", "string (bytes)", "job_ttl_s", "worker"),
    "webhook_secret": KeyInfo(
        "webhook-secret", "string", "none", "nobody now: the secret from before tenants, adopted by the default tenant"
    ),
    "readyz": KeyInfo("readyz", "string", "10 s (redis_config.PROBE_TTL_MS)", "API /readyz, start-up checks"),
    "tenants": KeyInfo("tenants", "set (tenant names)", "none", "key creation (blaze keys, admin API)"),
    "tenant_all": KeyInfo("t:<tenant>:idx:all", "zset", TENANT_INDEX_TTL, "job creation"),
    "tenant_status": KeyInfo("t:<tenant>:idx:status:<status>", "zset", TENANT_INDEX_TTL, "every status change (Lua)"),
    "tenant_engine": KeyInfo("t:<tenant>:idx:engine:<engine>", "zset", TENANT_INDEX_TTL, "job creation"),
    "api_key": KeyInfo("api-key:<sha256 of the key>", "hash (tenant, name, limits, admin)", "none", "blaze keys, admin API"),
    "api_key_ids": KeyInfo("api-keys", "hash (key id: sha256 of the key)", "none", "blaze keys, admin API"),
    "tenant_webhook_secret": KeyInfo(
        "t:<tenant>:webhook-secret", "string", "none", "first API or webhook worker needing it, rotation"
    ),
    "tenant_previous_webhook_secret": KeyInfo(
        "t:<tenant>:webhook-secret-previous", "string", "webhook_secret_grace_s", "rotation"
    ),
    "idempotency": KeyInfo("t:<tenant>:idem:<sha256 of the Idempotency-Key>", "string", "idempotency_ttl_s", "API create"),
    "openai_retry": KeyInfo(
        "t:<tenant>:openai-retry:<sha256 of key id, route and body>",
        "string (job id)",
        "openai_wait_s + 120 s",
        "API (OpenAI creates)",
    ),
    "rate_limits": KeyInfo("limits:LIMITER/<key id>/<rate>", "list (limits' moving window)", "the window", "API, through limits"),
    "audit": KeyInfo("audit", "stream", "none; at most audit_max_entries", "API, blaze keys"),
    "artifact_owners": KeyInfo("artifact-owners:<key>", "set (tenants)", "job_ttl_s", "worker, API (cache hits)"),
    "artifact_url_secret": KeyInfo("artifact-url-secret", "string", "none", "first API or webhook worker needing it"),
    "file": KeyInfo("file:<id>", "hash (tenant, filename, purpose, bytes, times)", "file_ttl_s", "API (files, batch output)"),
    "file_content": KeyInfo("file-content:<id>", "string (bytes)", "file_ttl_s", "API (files, batch output)"),
    "tenant_files": KeyInfo(
        "t:<tenant>:files", "zset", "file_ttl_s from the last put; expired entries trimmed on put and list", "API (files)"
    ),
    "tenant_file_sizes": KeyInfo(
        "t:<tenant>:file-sizes",
        "zset (<file id>:<bytes> by expiry)",
        "file_ttl_s from the last put; expired entries trimmed on put",
        "API (files, batch output)",
    ),
    "tenant_file_bytes": KeyInfo(
        "t:<tenant>:file-bytes",
        "string (bytes of file-sizes' entries)",
        "file_ttl_s from the last put",
        "API (files, batch output)",
    ),
    "batch": KeyInfo("batch:<id>", "hash", "24 h window + file_ttl_s", "API (batch create, progress, cancel, finalize)"),
    "batch_jobs": KeyInfo("batch-jobs:<id>", "list (job ids, in line order)", "the batch's", "API (batch create)"),
    "batch_errors": KeyInfo("batch-errors:<id>", "list (error-file lines)", "the batch's", "API (batch create)"),
    "tenant_batches": KeyInfo(
        "t:<tenant>:batches",
        "zset",
        "a batch's from the last create; expired entries trimmed on create and list",
        "API (batch create)",
    ),
    "batch_create_lock": KeyInfo(
        "batch-create-lock", "string (holder)", "30 s, renewed while held", "the API process creating a batch's jobs"
    ),
    "batches_open": KeyInfo("batches-open", "zset (batch ids by expiry)", "none; a batch leaves it when it ends", "API"),
    "batch_lock": KeyInfo("batch-lock:<id>", "string (holder)", "60 s", "the API process finalizing the batch"),
}


class Keys:
    """Every Redis key Blaze Jobs writes, under one prefix (``BLAZE_REDIS_PREFIX``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.unacked = f"{prefix}unacked"  # kombu's, under the same global key prefix
        self.workers = f"{prefix}workers"
        self.inboxes = f"{prefix}inboxes"  # the workers' inbox queues handed messages (inboxes.py)
        self.reaper = f"{prefix}reaper"
        self.webhook_retries = f"{prefix}webhook-retries"
        self.cache_index = f"{prefix}cache-index"
        self.webhook_secret = f"{prefix}webhook-secret"
        self.readyz = f"{prefix}readyz"
        self.api_key_ids = f"{prefix}api-keys"
        #: The prefix ``limits`` keeps its rate-limit windows under.
        self.rate_limits = f"{prefix}limits"
        self.audit = f"{prefix}audit"
        self.artifact_url_secret = f"{prefix}artifact-url-secret"
        #: Every tenant that ever had a key, so the reaper can trim indexes nobody lists.
        self.tenants = f"{prefix}tenants"
        #: The batches not ended yet, scored by when they expire, which the API advances.
        self.batches_open = f"{prefix}batches-open"
        #: Held by the API process creating a batch's jobs: one batch is admitted at a time.
        self.batch_create_lock = f"{prefix}batch-create-lock"
        #: The deployment's status indexes of live jobs (queued, running), which the reaper
        #: scans; lists page through the tenants' own indexes (``tenant_statuses``).
        self.live_statuses = [self.status(JobStatus.queued.value), self.status(JobStatus.running.value)]

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def status(self, status: str) -> str:
        return f"{self.prefix}idx:status:{status}"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}lease:{job_id}"

    def stream(self, job_id: str) -> str:
        return f"{self.prefix}job-stream:{job_id}"

    def deliveries(self, job_id: str) -> str:
        return f"{self.prefix}job-deliveries:{job_id}"

    def webhook_order(self, job_id: str) -> str:
        return f"{self.prefix}job-webhook-order:{job_id}"

    def queue(self, name: str) -> str:
        """The list kombu reads queue ``name`` from (kombu applies the same prefix)."""
        return f"{self.prefix}{name}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}worker:{name}"

    def cache(self, key: str) -> str:
        return f"{self.prefix}cache:{key}"

    def artifact(self, key: str) -> str:
        return f"{self.prefix}artifact:{key}"

    def tenant_all(self, tenant: str) -> str:
        return f"{self.prefix}t:{tenant}:idx:all"

    def tenant_status(self, tenant: str, status: str) -> str:
        return f"{self.prefix}t:{tenant}:idx:status:{status}"

    def tenant_statuses(self, tenant: str) -> list[str]:
        """The tenant's status indexes, in ``JobStatus`` order (as ``statuses``)."""
        return [self.tenant_status(tenant, s.value) for s in JobStatus]

    def tenant_engine(self, tenant: str, engine: str) -> str:
        return f"{self.prefix}t:{tenant}:idx:engine:{engine}"

    def api_key(self, key_hash: str) -> str:
        return f"{self.prefix}api-key:{key_hash}"

    def tenant_webhook_secret(self, tenant: str) -> str:
        return f"{self.prefix}t:{tenant}:webhook-secret"

    def tenant_previous_webhook_secret(self, tenant: str) -> str:
        return f"{self.prefix}t:{tenant}:webhook-secret-previous"

    def idempotency(self, tenant: str, key_hash: str) -> str:
        return f"{self.prefix}t:{tenant}:idem:{key_hash}"

    def openai_retry(self, tenant: str, fingerprint: str) -> str:
        return f"{self.prefix}t:{tenant}:openai-retry:{fingerprint}"

    def artifact_owners(self, key: str) -> str:
        return f"{self.prefix}artifact-owners:{key}"

    def index_for(self, *, tenant: str, status: str | None, engine: str | None) -> str:
        """The tenant's index ``GET /v1/jobs`` pages through for these filters."""
        if status:
            return self.tenant_status(tenant, status)
        if engine:
            return self.tenant_engine(tenant, engine)
        return self.tenant_all(tenant)

    def event_keys(self, job_id: str) -> list[str]:
        """What a script that makes one of the job's events touches, in the order the shared
        Lua (``lua/events.lua``) takes them: the job, its stream, deliveries and webhook order,
        and the webhooks queue."""
        return [
            self.job(job_id),
            self.stream(job_id),
            self.deliveries(job_id),
            self.webhook_order(job_id),
            self.queue(WEBHOOK_QUEUE),
        ]

    def file(self, file_id: str) -> str:
        return f"{self.prefix}file:{file_id}"

    def file_content(self, file_id: str) -> str:
        return f"{self.prefix}file-content:{file_id}"

    def tenant_files(self, tenant: str) -> str:
        return f"{self.prefix}t:{tenant}:files"

    def tenant_file_sizes(self, tenant: str) -> str:
        return f"{self.prefix}t:{tenant}:file-sizes"

    def tenant_file_bytes(self, tenant: str) -> str:
        return f"{self.prefix}t:{tenant}:file-bytes"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}"

    def batch_jobs(self, batch_id: str) -> str:
        return f"{self.prefix}batch-jobs:{batch_id}"

    def batch_errors(self, batch_id: str) -> str:
        return f"{self.prefix}batch-errors:{batch_id}"

    def tenant_batches(self, tenant: str) -> str:
        return f"{self.prefix}t:{tenant}:batches"

    def batch_lock(self, batch_id: str) -> str:
        return f"{self.prefix}batch-lock:{batch_id}"
