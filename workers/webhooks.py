"""``python -m blaze_jobs.workers.webhooks`` (``blaze worker --engine webhooks``): a worker that sends
webhook deliveries. It needs no GPU and imports no model library; its task threads spend
their time waiting on receivers, so a slow or dead receiver holds up only this queue. With ``--metrics-port`` it records its
metrics and serves them there.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket

from celery.signals import worker_shutdown

from blaze_jobs import logs, redis_config
from blaze_jobs.celery_app import app
from blaze_jobs.keys import WEBHOOK_QUEUE
from blaze_jobs.settings import get_settings
from blaze_jobs.webhook_retries import RetryMover
from blaze_jobs.webhooks import Deliverer, install_deliverer
from blaze_jobs.worker_context import add_metrics_options, serve_metrics


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="blaze worker --engine webhooks", description="Send webhook deliveries.")
    parser.add_argument("--concurrency", type=int, default=settings.webhook_concurrency, help="deliveries sent at once")
    parser.add_argument("--loglevel", default="INFO")
    add_metrics_options(parser)
    args = parser.parse_args(argv)
    logs.configure(args.loglevel, settings)
    name = f"{WEBHOOK_QUEUE}-{os.getpid()}@{socket.gethostname()}"
    serve_metrics(args, prog=parser.prog)
    # Each attempt is logged once, with its outcome, by blaze_jobs.webhooks.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    # 0. Refuse a Redis that would evict accepted jobs; warn about one that keeps none.
    redis_config.check_at_start(settings, log=logging.getLogger("blaze_jobs.worker"))

    # 1. The HTTP client and the signing secret, once; the thread that queues due retries.
    deliverer = Deliverer(settings, name=name)
    install_deliverer(deliverer)
    retries = RetryMover(deliverer.redis, settings)
    deliverer.retry_scheduled = retries.wake
    retries.start()

    def stop(**_: object) -> None:
        retries.stop()
        deliverer.close()

    worker_shutdown.connect(stop, weak=False)

    # 2. Consume the webhooks queue with threads. Events on, so Flower sees each delivery.
    app.worker_main(
        [
            "worker",
            f"--queues={WEBHOOK_QUEUE}",
            "--pool=threads",
            f"--concurrency={args.concurrency}",
            "--task-events",
            f"--hostname={name}",
            f"--loglevel={args.loglevel}",
            "--without-mingle",
            # Nothing uses gossip, and Celery logs an error restarting it after every Redis outage.
            "--without-gossip",
        ]
    )


if __name__ == "__main__":
    main()
