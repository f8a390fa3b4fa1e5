"""The audit trail: who made or revoked a key, changed its limits, rotated a webhook secret or
canceled a job, for which tenant, when, and from where. A bounded Redis stream (``Keys.audit``,
at most ``BLAZE_AUDIT_MAX_ENTRIES``) that admin keys read at ``GET /v1/admin/audit``.

The address is the one the request showed (or the CLI's host name), kept for the record only:
nothing is ever authorised by it.
"""

from __future__ import annotations

import re
import time
from typing import Any

import redis
import redis.asyncio

from blaze_jobs.api_keys import ApiKey
from blaze_jobs.keys import Keys
from blaze_jobs.records import decode, text
from blaze_jobs.settings import Settings

#: What an entry may say was done.
ACTIONS = ("key.create", "key.revoke", "key.update", "webhook_secret.rotate", "job.cancel")
#: The key id entries made by ``blaze`` commands on the operator's host carry.
CLI_ID = "cli"
#: A page's cursor: the stream id of the last entry the previous page gave.
CURSOR = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
#: Each half of a stream id is an unsigned 64-bit number.
_ID_MAX = 2**64 - 1


def cli_operator(settings: Settings, name: str) -> ApiKey:
    """Who a ``blaze`` command that changes keys in Redis directly is in the trail: ``cli``,
    an admin of the default tenant, named for what ran it (the OS user, ``blaze-local``)."""
    return ApiKey(id=CLI_ID, tenant=settings.default_tenant, name=name, admin=True)


def change_target(key_id: str, changes: dict[str, Any]) -> str:
    """What a ``key.update`` entry names: the key and its new limits (``default``: the deployment's)."""
    return " ".join([key_id, *(f"{name}={'default' if value is None else value}" for name, value in changes.items())])


def _entry(key: ApiKey, *, action: str, target: str, tenant: str | None, address: str | None) -> dict[str, str]:
    if action not in ACTIONS:
        raise ValueError(f"action: {action!r} is not one of {', '.join(ACTIONS)}")
    return {
        "who_id": key.id,
        "who_name": key.name,
        "who_tenant": key.tenant,
        "tenant": tenant or key.tenant,
        "action": action,
        "target": target,
        "at": repr(time.time()),
        "address": address or "",
    }


def _xadd_args(settings: Settings, entry: dict[str, str]) -> dict[str, Any]:
    # ``~``: Redis trims whole nodes of the stream, so the bound costs nothing per entry.
    return {"name": Keys(settings.redis_prefix).audit, "fields": entry, "maxlen": settings.audit_max_entries, "approximate": True}


def record(
    client: redis.Redis,
    settings: Settings,
    *,
    key: ApiKey,
    action: str,
    target: str,
    address: str | None,
    tenant: str | None = None,
) -> str:
    """Append what ``key`` did (``action``, one of ``ACTIONS``) to ``target`` (a key or job id)
    in ``tenant`` (by default the key's own); the entry's stream id."""
    entry = _entry(key, action=action, target=target, tenant=tenant, address=address)
    return text(client.xadd(**_xadd_args(settings, entry)))


async def record_async(
    client: redis.asyncio.Redis,
    settings: Settings,
    *,
    key: ApiKey,
    action: str,
    target: str,
    address: str | None,
    tenant: str | None = None,
) -> str:
    """``record`` for the API's client."""
    entry = _entry(key, action=action, target=target, tenant=tenant, address=address)
    return text(await client.xadd(**_xadd_args(settings, entry)))


def _before(cursor: str) -> str | None:
    """The newest stream id older than ``cursor``; None if none can be (``0-0``)."""
    if not CURSOR.fullmatch(cursor):
        raise ValueError(f"cursor: not a cursor this trail gave (got {cursor!r})")
    # Past the largest id, every entry is older: the page starts at the newest.
    ms, seq = (min(int(part), _ID_MAX) for part in cursor.split("-"))
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{_ID_MAX}" if ms else None


def _range_args(settings: Settings, *, limit: int, cursor: str | None) -> dict[str, Any] | None:
    newest = _before(cursor) if cursor else "+"
    if newest is None:
        return None
    # One more than the page, to know whether another page follows.
    return {"name": Keys(settings.redis_prefix).audit, "max": newest, "min": "-", "count": limit + 1}


def _page(rows: Any, limit: int) -> tuple[list[dict[str, Any]], str | None]:
    entries: list[dict[str, Any]] = []
    for entry_id, raw in (rows or [])[:limit]:
        fields = decode(raw)
        entries.append(
            {
                "id": text(entry_id),
                "at": float(fields.get("at") or 0),
                "who": {
                    "key_id": fields.get("who_id", ""),
                    "name": fields.get("who_name", ""),
                    "tenant": fields.get("who_tenant", ""),
                },
                "tenant": fields.get("tenant", ""),
                "action": fields.get("action", ""),
                "target": fields.get("target", ""),
                "address": fields.get("address") or None,
            }
        )
    return entries, (str(entries[-1]["id"]) if len(rows or []) > limit else None)


def read(
    client: redis.Redis, settings: Settings, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Entries newest first, ``limit`` at a time, and the cursor of the next page (None at the end)."""
    args = _range_args(settings, limit=limit, cursor=cursor)
    return _page(client.xrevrange(**args) if args else [], limit)


async def read_async(
    client: redis.asyncio.Redis, settings: Settings, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """``read`` for the API's client."""
    args = _range_args(settings, limit=limit, cursor=cursor)
    return _page(await client.xrevrange(**args) if args else [], limit)
