"""``python -m blaze_jobs.api``: serve the API with uvicorn (uvloop + httptools)."""

from __future__ import annotations

import argparse

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


if __name__ == "__main__":
    main()
