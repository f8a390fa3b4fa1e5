"""``python -m blaze_jobs.api``: serve the API with uvicorn (uvloop + httptools)."""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn

from blaze_jobs import logs
from blaze_jobs.settings import get_settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="blaze api", description="Serve the Blaze Jobs HTTP API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    # X-Forwarded-For and -Proto are believed only from the proxies configured: uvicorn
    # alone believes them from 127.0.0.1, so any local process could claim any address.
    proxies = get_settings().trusted_proxies
    with metrics_folder():
        uvicorn.run(
            "blaze_jobs.api.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            loop="uvloop",
            http="httptools",
            log_level=args.log_level,
            log_config=logs.uvicorn_config(args.log_level),
            access_log=args.log_level == "debug",
            proxy_headers=bool(proxies),
            forwarded_allow_ips=",".join(proxies) or None,
        )


#: The private metrics folders' names: ``blaze-api-metrics-<pid of blaze api>-<random>``.
FOLDER_PREFIX = "blaze-api-metrics-"


@contextmanager
def metrics_folder() -> Iterator[None]:
    """The folder every API process writes its metric values in (prometheus-client's
    multiprocess mode), so ``/metrics`` sums them whichever process answers: the
    ``PROMETHEUS_MULTIPROC_DIR`` given, emptied of an earlier run's values, or a private one
    named for this process, removed at exit. Named in the environment before uvicorn starts
    its processes: each picks its kind of value when it first imports prometheus-client."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, exist_ok=True)
        for path in glob.glob(os.path.join(given, "*.db")):
            os.remove(path)
        remove_dead_folders(tempfile.gettempdir())
        yield
        return
    folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    remove_dead_folders(tempfile.gettempdir())
    # uvicorn, once it has shut down on SIGTERM, raises the signal again under the handler it
    # found: the default one would end the process before the folder is removed.
    previous = signal.signal(signal.SIGTERM, _exit_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(folder, ignore_errors=True)


def remove_dead_folders(parent: str) -> None:
    """Remove the private metrics folders, under ``parent``, of ``blaze api`` processes that
    ended without removing theirs (killed, or crashed). Called once the folder is named in
    the environment: it imports prometheus-client."""
    from .metrics import alive

    for path in glob.glob(os.path.join(parent, f"{FOLDER_PREFIX}*-*")):
        owner = os.path.basename(path).removeprefix(FOLDER_PREFIX).partition("-")[0]
        if owner.isdigit() and os.path.isdir(path) and os.stat(path).st_uid == os.getuid() and not alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _exit_terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # the status a shell gives a process SIGTERM ended


if __name__ == "__main__":
    main()
