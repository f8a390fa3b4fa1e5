"""``GET /`` and ``GET /console``: the web console, static files the API serves itself.

The console is plain HTML, CSS and JavaScript modules with no build step, no CDN and no
external fonts: the files under ``api/console/`` are what the browser runs. They hold no data
and need no key; the console asks its user for an API key and reads everything through the
same ``/v1`` routes any client calls, with that key as a Bearer token.

Only the files found in that folder at start are served, by their exact names, so no path a
request spells (``..``, an encoded slash, a symlink added later) reaches any other file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import problems
from .request_context import settings_of

#: The console's files, shipped as package data beside this module.
FOLDER = Path(__file__).with_name("console")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

#: Sent with every console file. Browsers read the policy on the HTML page; nosniff keeps a
#: script or style from being read as anything but its declared type.
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # No file changes while the API runs, but an upgrade changes them under the same names:
    # the browser keeps its copy and asks each time whether it is still current (a 304 if so).
    "Cache-Control": "no-cache",
}


class Asset:
    """One console file: its bytes, type and entity tag, read once at start."""

    def __init__(self, path: Path) -> None:
        self.body = path.read_bytes()
        self.media_type = CONTENT_TYPES[path.suffix]
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'


ASSETS = {path.name: Asset(path) for path in sorted(FOLDER.iterdir()) if path.is_file() and path.suffix in CONTENT_TYPES}

router = APIRouter(include_in_schema=False)


def content_security_policy(request: Request) -> str:
    """The console's policy: its own files only, no inline script or style, no frames.
    Images may also come from ``BLAZE_PUBLIC_URL``, the origin artifact URLs are signed for."""
    images = ["'self'", "data:"]
    public = settings_of(request.app).public_url
    if public:
        parts = urlsplit(public)
        images.append(f"{parts.scheme}://{parts.netloc}")
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src {' '.join(images)}",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def _served(request: Request, asset: Asset) -> Response:
    headers = {**COMMON_HEADERS, "ETag": asset.etag}
    if asset.media_type.startswith("text/html"):
        headers["Content-Security-Policy"] = content_security_policy(request)
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/", response_class=Response)
@router.get("/console", response_class=Response)
async def console_page(request: Request) -> Response:
    """The console's single page (its views are hash routes: ``#/jobs/<id>``)."""
    return _served(request, ASSETS["index.html"])


@router.get("/console/assets/{name}", response_class=Response)
async def console_asset(request: Request, name: str) -> Response:
    """A script, style sheet or icon of the console, by its file name."""
    asset = ASSETS.get(name)
    if asset is None:
        return problems.problem(404, "Not found", f"the console has no file {name!r}")
    return _served(request, asset)
