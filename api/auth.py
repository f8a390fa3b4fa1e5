"""Who a request is: ``Authorization: Bearer <API key>`` on every ``/v1`` route, as FastAPI
dependencies the routes share. A key names its tenant; a job of another tenant is a 404."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from starlette.exceptions import HTTPException

from blaze_jobs.api_keys import ADMIN_TOKEN_ID, AUTH_OFF_ID, ApiKey, bootstrap_key

from . import rate_limits
from .request_context import raw_header, settings_of


class Unauthorized(HTTPException):
    """No usable key: a 401 problem with ``WWW-Authenticate: Bearer``."""

    def __init__(self, detail: str) -> None:
        super().__init__(401, detail, headers={"WWW-Authenticate": "Bearer"})


async def authenticated(request: Request) -> ApiKey:
    """The key the request carries; a 401 when it has none, or one that is unknown or revoked."""
    settings = settings_of(request.app)
    if settings.auth == "off":
        return bootstrap_key(settings, AUTH_OFF_ID)
    header = raw_header(request, b"authorization")
    scheme, _, token = (header or b"").decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("an API key is required: send Authorization: Bearer <key>")
    if settings.admin_token and hmac.compare_digest(token.encode(), settings.admin_token.encode()):
        return bootstrap_key(settings, ADMIN_TOKEN_ID)
    key: ApiKey | None = None  # the Redis-stored keys: see api_keys
    if key is None:
        raise Unauthorized("unknown or revoked API key")
    await rate_limits.check(request, key)
    return key


async def admin(key: Annotated[ApiKey, Depends(authenticated)]) -> ApiKey:
    """An admin key; a 403 for any other."""
    if not key.admin:
        raise HTTPException(403, "this needs an admin key")
    return key


#: What a route declares to know its caller: ``key: Caller``.
Caller = Annotated[ApiKey, Depends(authenticated)]
Admin = Annotated[ApiKey, Depends(admin)]
