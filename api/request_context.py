"""What routes read off a request beyond their parameters: the deployment's settings, a raw
header, and the base URL the client reached the API at (every URL the API answers with
starts with it)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from blaze_jobs.settings import Settings, get_settings


def settings_of(app: FastAPI) -> Settings:
    """The settings the app was made with (the ``BLAZE_*`` environment before it started)."""
    store = getattr(app.state, "store", None)
    return store.settings if store is not None else get_settings()


def raw_header(request: Request, name: bytes) -> bytes | None:
    """A request header by its lower-case name, read straight off the ASGI scope (the create
    route reads two: building ``request.headers`` for them costs more than the look-ups)."""
    return next((value for key, value in request.scope["headers"] if key == name), None)


#: Base URLs by what they are made of; Starlette builds one in about 10 µs, every request.
_BASE_URLS: dict[tuple[Any, ...], str] = {}


def base_url(request: Request) -> str:
    """Where the client reached the API (``BLAZE_PUBLIC_URL`` if set), without a final slash."""
    public = settings_of(request.app).public_url
    if public:
        return public
    scope = request.scope
    server = scope.get("server")  # a tuple from uvicorn, a list from some test clients
    key = (scope["scheme"], raw_header(request, b"host"), tuple(server) if server else None, scope.get("root_path", ""))
    url = _BASE_URLS.get(key)
    if url is None:
        if len(_BASE_URLS) >= 256:  # the Host header is the client's to choose: stay bounded
            _BASE_URLS.clear()
        url = _BASE_URLS[key] = str(request.base_url).rstrip("/")
    return url
