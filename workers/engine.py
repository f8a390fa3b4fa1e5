"""``python -m workers.engine --engine diffusion``: a worker process serving one engine on one device.

It loads the engine and its default model once, then consumes the engine's queue with
Celery's thread pool; each task thread runs one job through ``blaze_jobs.worker.run_job``.
"""

from __future__ import annotations

import argparse
import logging
import os

from blaze_jobs.celery_app import app
from blaze_jobs.settings import ENGINES, get_settings
from blaze_jobs.worker import Runtime, install_runtime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="blaze worker", description="Run jobs of one engine on one device.")
    parser.add_argument("--engine", required=True, choices=ENGINES)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 … (default BLAZE_DEVICE)")
    parser.add_argument("--concurrency", type=int, default=1, help="task threads (jobs held at once)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # 1. Load the engine and its default model before taking any job.
    settings = get_settings()
    runtime = Runtime(settings, engine=args.engine, device=args.device)
    runtime.engine.prepare(settings.default_model(args.engine))
    install_runtime(runtime)

    # 2. Consume the engine's queue. Events on, so Flower sees the worker and each job.
    app.worker_main(
        [
            "worker",
            f"--queues={args.engine}",
            "--pool=threads",
            f"--concurrency={args.concurrency}",
            "--task-events",
            f"--hostname={args.engine}-{os.getpid()}@%h",
            f"--loglevel={args.loglevel}",
            "--without-mingle",
        ]
    )


if __name__ == "__main__":
    main()
