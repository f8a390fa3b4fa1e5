"""``python -m blaze_jobs.workers.engine --engine diffusion``: a worker process serving one engine on one device.

It loads the engine and its default model once, then consumes the engine's queue with
Celery's thread pool: one task thread per job the batcher may put in a batch, each handing
its job to the batcher (``blaze_jobs.worker.run_job``). The circuit breaker cancels the
worker's consumer of the queue when it opens and adds it back when it half-opens; Flower
shows both. With ``--metrics-port`` it records its metrics and serves them there.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket

from celery.signals import worker_shutdown

from blaze_jobs import inboxes, logs, redis_config
from blaze_jobs.celery_app import app
from blaze_jobs.settings import ENGINES, get_settings
from blaze_jobs.worker_context import WorkerContext, add_metrics_options, install_context, serve_metrics


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="blaze worker", description="Run jobs of one engine on one device.")
    parser.add_argument("--engine", required=True, choices=ENGINES)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 … (default BLAZE_DEVICE)")
    parser.add_argument("--max-batch", type=int, default=settings.max_batch, help="most jobs in one batch")
    parser.add_argument("--max-wait-ms", type=float, default=settings.max_wait_ms, help="longest wait for a fuller batch")
    parser.add_argument("--concurrency", type=int, default=None, help="task threads (default: twice --max-batch)")
    parser.add_argument("--loglevel", default="INFO")
    add_metrics_options(parser)
    args = parser.parse_args(argv)
    logs.configure(args.loglevel, settings)
    name = f"{args.engine}-{os.getpid()}@{socket.gethostname()}"
    # Before anything loads: a taken port is a mistake to report at once, not after the model.
    serve_metrics(args, prog=parser.prog)

    # 0. Refuse a Redis that would evict accepted jobs; warn about one that keeps none.
    redis_config.check_at_start(settings, log=logging.getLogger("blaze_jobs.worker"))

    # 1. Load the engine and its default model before taking any job.
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)

    def stop_consuming() -> None:
        app.control.cancel_consumer(args.engine, destination=[name], reply=False)

    def consume_again() -> None:
        app.control.add_consumer(args.engine, destination=[name], reply=False)

    runtime = WorkerContext(
        settings,
        engine=args.engine,
        device=args.device,
        name=name,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        on_open=stop_consuming,
        on_half_open=consume_again,
    )
    runtime.engine.prepare(settings.default_model(args.engine))
    install_context(runtime)
    runtime.start()
    worker_shutdown.connect(lambda **_: runtime.close(), weak=False)

    # 2. Consume the engine's queue. Events on, so Flower sees the worker and each job.
    app.worker_main(
        [
            "worker",
            # Its inbox too: a job a peer faulted on is handed there, to run here next.
            f"--queues={args.engine},{inboxes.inbox(args.engine, name)}",
            "--pool=threads",
            # Twice the batch: while one batch runs, the next one gathers, so batches stay full.
            f"--concurrency={args.concurrency or 2 * args.max_batch}",
            "--task-events",
            f"--hostname={name}",
            f"--loglevel={args.loglevel}",
            "--without-mingle",
            # Nothing here listens to other workers' gossip (no elections, no clock sync), and
            # Celery's restart of it after a lost connection fails (logging an error each time).
            "--without-gossip",
        ]
    )


if __name__ == "__main__":
    main()
