"""Every Celery setting of Blaze Jobs, read from the one settings object (``BLAZE_*``)."""

from blaze_jobs.settings import ENGINES, get_settings

_settings = get_settings()

broker_url = _settings.redis_url
# Workers consume through kombu's Redis transport with channels that outlive a Redis restart:
# ``blaze_jobs.celery_app`` selects ``blaze_jobs.transport`` as each worker starts.
broker_transport_options = {
    # Celery's queues, bindings and event channels share the job records' key prefix.
    "global_keyprefix": _settings.redis_prefix,
    # Redis redelivers an unacknowledged message after this long: it must outlast any job.
    "visibility_timeout": _settings.visibility_timeout_s,
    # Look for such messages every 10 s (kombu's default scans every 100 s).
    "unacked_restore_interval": 10,
    "unacked_restore_throttle": 1,
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    # Let a worker notice a Redis restart within seconds instead of on its next blocking read.
    "health_check_interval": 10,
}
broker_connection_retry_on_startup = True
# Retry forever: a worker outliving a Redis restart is the point.
broker_connection_max_retries = None

# The job record in Redis is what clients read; Celery's result backend stays unused.
task_ignore_result = True
# One queue per engine, and a task name per engine, so a worker serves exactly one engine.
task_routes = {f"blaze.{engine}.generate": {"queue": engine} for engine in ENGINES}
# Webhook deliveries have a queue and workers of their own: a slow receiver never holds a GPU.
task_routes["blaze.webhooks.deliver"] = {"queue": "webhooks"}
task_create_missing_queues = True
task_default_queue = "echo"

# A job is acknowledged only after it ends, so a worker that dies mid-job hands it back.
task_acks_late = True
task_reject_on_worker_lost = True
# Each worker thread holds at most one job it has not started; the rest stay in Redis for peers.
worker_prefetch_multiplier = 1

# Events on, so Flower sees every job (received, started, succeeded) on every worker, sent in
# batches (one PUBLISH for a short job's three) by the consumer of ``blaze_jobs.task_events``.
worker_send_task_events = True
worker_consumer = "blaze_jobs.task_events:Consumer"
task_send_sent_event = True
task_track_started = True
worker_hijack_root_logger = False
imports = ("blaze_jobs.tasks",)
