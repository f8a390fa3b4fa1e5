"""API keys: who a request is. A key belongs to a tenant, carries its limits, and is stored
only as a hash; ``blaze keys`` and ``/v1/admin/keys`` make, list and revoke them."""

from __future__ import annotations

from dataclasses import dataclass

from blaze_jobs.settings import Settings

#: The id of the principal ``BLAZE_ADMIN_TOKEN`` and ``BLAZE_AUTH=off`` stand for.
ADMIN_TOKEN_ID = "admin-token"
AUTH_OFF_ID = "auth-off"


@dataclass(frozen=True)
class ApiKey:
    """A key as the API knows it (never its secret): its id, tenant, name, limits, admin flag."""

    id: str
    tenant: str
    name: str
    admin: bool = False
    #: Requests allowed, in ``limits`` notation (``600/minute``); None: not rate limited.
    rate: str | None = None
    #: The tenant's jobs queued plus running this key may reach; None: no quota.
    max_jobs: int | None = None
    #: The highest ``priority`` this key may ask for; None: any.
    max_priority: int | None = None
    created_at: float = 0.0


def bootstrap_key(settings: Settings, key_id: str) -> ApiKey:
    """The admin principal of ``BLAZE_ADMIN_TOKEN`` (or of every request with auth off):
    an admin of ``BLAZE_DEFAULT_TENANT``, with no rate limit or quota."""
    return ApiKey(id=key_id, tenant=settings.default_tenant, name=key_id, admin=True)
