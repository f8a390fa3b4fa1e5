"""API keys: who a request is. A key belongs to a tenant, carries its limits, and is stored
only as a hash; ``blaze keys`` and ``/v1/admin/keys`` make, list, change and revoke them.

Each operation has a blocking form (redis-py, for the CLI) and an asyncio one (for the API),
built from the same pieces: what a key's hash holds (``_fields``), what a stored hash means
(``_decode``) and where a key or id is found (``_Where``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import limits
import redis
import redis.asyncio

from blaze_jobs import scripts
from blaze_jobs.keys import Keys
from blaze_jobs.records import decode, text
from blaze_jobs.settings import Settings

#: The id of the principal ``BLAZE_ADMIN_TOKEN`` and ``BLAZE_AUTH=off`` stand for.
ADMIN_TOKEN_ID = "admin-token"
AUTH_OFF_ID = "auth-off"
#: What every secret starts with, so a leaked one is recognisable (secret scanners, logs).
SECRET_PREFIX = "bz_live_"
#: A tenant's or a key's name: safe in a Redis key, a URL and a log line.
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: A key's id: public, printed by ``blaze keys list``, used to revoke a key without its secret.
KEY_ID = re.compile(r"^key_[0-9a-f]{12}$")
#: A request rate, in the part of ``limits``' notation the API documents: ``600/minute``,
#: ``10 per second``, ``100/2 hours``. (Anchored, and written for JSON Schema as well.)
RATE = re.compile(r"^[1-9][0-9]{0,8} ?(/|per) ?([1-9][0-9]{0,8} ?)?(second|minute|hour|day|month|year)s?$")
#: The limits a key carries, which ``update_key`` may change.
LIMITS = ("rate", "max_jobs", "max_priority")


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


def new_secret() -> str:
    """A new key's secret: 192 random bits, URL-safe, after ``SECRET_PREFIX``."""
    return SECRET_PREFIX + secrets.token_urlsafe(24)


def new_key_id() -> str:
    """A new key's public id (random, so it says nothing about the secret)."""
    return "key_" + secrets.token_hex(6)


def key_hash(secret: str) -> str:
    """What Redis stores a key under. A secret has 192 random bits, so no guess or table can
    find it from its hash: a fast unsalted SHA-256 is enough, where a password would need a
    slow salted one, and it lets a request find its key with one look-up."""
    return hashlib.sha256(secret.encode()).hexdigest()


# --- Validation: each raises ValueError naming the field ---------------------------------


def check_name(field: str, value: str) -> str:
    """``value`` if it is a valid tenant or key name."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(f"{field}: must be 1 to 64 of A-Z a-z 0-9 _ . - (got {value!r})")
    return value


def check_rate(value: str | None) -> str | None:
    """``value`` if ``limits`` can read it (``600/minute``, ``10 per second``)."""
    if value is None:
        return None
    try:
        if not isinstance(value, str) or not RATE.fullmatch(value):
            raise ValueError(value)
        limits.parse(value)
    except ValueError:
        raise ValueError(f"rate: not a rate such as 600/minute or 10/second (got {value!r})") from None
    return value


def check_count(field: str, value: int | None, *, least: int) -> int | None:
    """``value`` if it is an integer of at least ``least``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{field}: must be an integer of at least {least} (got {value!r})")
    return value


def check_limits(changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` to a key's limits, checked; None for a limit means the deployment's default."""
    unknown = set(changes) - set(LIMITS)
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: not a limit a key has (limits: {', '.join(LIMITS)})")
    checked: dict[str, Any] = {}
    if "rate" in changes:
        checked["rate"] = check_rate(changes["rate"])
    if "max_jobs" in changes:
        checked["max_jobs"] = check_count("max_jobs", changes["max_jobs"], least=1)
    if "max_priority" in changes:
        checked["max_priority"] = check_count("max_priority", changes["max_priority"], least=0)
    return checked


# --- The encoding: one hash per key, shared by both clients -------------------------------


def _limit_fields(limits_: Mapping[str, Any]) -> dict[str, str]:
    # An empty field is "the deployment's default", read at look-up time (see _decode).
    return {name: "" if value is None else str(value) for name, value in limits_.items()}


def _fields(key: ApiKey) -> dict[str, str]:
    return {
        "id": key.id,
        "tenant": key.tenant,
        "name": key.name,
        "admin": "1" if key.admin else "0",
        "created_at": repr(key.created_at),
        **_limit_fields({"rate": key.rate, "max_jobs": key.max_jobs, "max_priority": key.max_priority}),
    }


def _decode(raw: Mapping[Any, Any], settings: Settings) -> ApiKey | None:
    """The key a stored hash describes (None for a missing one), its unset limits filled with
    the deployment's defaults now, so changing a default applies to every key made without."""
    if not raw:
        return None
    fields = decode(dict(raw))
    return ApiKey(
        id=fields["id"],
        tenant=fields["tenant"],
        name=fields["name"],
        admin=fields.get("admin") == "1",
        rate=fields.get("rate") or settings.default_rate or None,
        max_jobs=int(fields["max_jobs"]) if fields.get("max_jobs") else settings.default_max_jobs or None,
        max_priority=int(fields["max_priority"]) if fields.get("max_priority") else None,
        created_at=float(fields.get("created_at") or 0),
    )


def _new_key(*, tenant: str, name: str, admin: bool, **limits_: Any) -> ApiKey:
    check_name("tenant", tenant)
    check_name("name", name)
    checked = check_limits(limits_)
    return ApiKey(id=new_key_id(), tenant=tenant, name=name, admin=bool(admin), created_at=time.time(), **checked)


def _queue_create(pipe: Any, keys: Keys, secret: str, key: ApiKey) -> None:
    hashed = key_hash(secret)
    pipe.hset(keys.api_key(hashed), mapping=_fields(key))
    pipe.hset(keys.api_key_ids, key.id, hashed)
    # The tenant's first key makes it one the reaper trims the indexes of (reaper.trim).
    pipe.sadd(keys.tenants, key.tenant)


@dataclass(frozen=True)
class _Where:
    """Where to find a key given by its secret or its id: one field of one hash, whose
    value (the key's id, or its hash) completes the pair the key is stored under."""

    key: str
    field: str
    given_id: str | None
    given_hash: str | None

    @classmethod
    def of(cls, keys: Keys, key_or_id: str) -> _Where:
        if KEY_ID.fullmatch(key_or_id):
            return cls(keys.api_key_ids, key_or_id, key_or_id, None)
        hashed = key_hash(key_or_id)
        return cls(keys.api_key(hashed), "id", None, hashed)

    def pair(self, found: Any) -> tuple[str, str] | None:
        """(id, hash) of the key, from what ``key``'s ``field`` held; None if nothing."""
        if not found:
            return None
        return (self.given_id or text(found), self.given_hash or text(found))


def _queue_revoke(pipe: Any, keys: Keys, key_id: str, hashed: str) -> None:
    pipe.hgetall(keys.api_key(hashed))
    pipe.delete(keys.api_key(hashed))
    pipe.hdel(keys.api_key_ids, key_id)


def _update_args(keys: Keys, hashed: str, changes: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    # lua/key_update.lua changes a key only while it exists: a revoke racing an update must
    # not leave a half key behind.
    args = [part for pair in _limit_fields(changes).items() for part in pair]
    return [keys.api_key(hashed)], args


def _pairs(reply: Any) -> dict[Any, Any]:
    """A script's HGETALL reply (a flat list) as a mapping."""
    if not reply:
        return {}
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _sorted(found: list[ApiKey | None], tenant: str | None) -> list[ApiKey]:
    keys = [k for k in found if k is not None and (tenant is None or k.tenant == tenant)]
    return sorted(keys, key=lambda k: (k.tenant, k.created_at, k.id))


# --- Blocking (the CLI) -------------------------------------------------------------------


def create_key(
    client: redis.Redis,
    settings: Settings,
    *,
    tenant: str,
    name: str,
    admin: bool = False,
    rate: str | None = None,
    max_jobs: int | None = None,
    max_priority: int | None = None,
) -> tuple[str, ApiKey]:
    """Make a key: its secret (shown once, never stored) and what it is. Limits left None
    follow the deployment's defaults (``BLAZE_DEFAULT_RATE``, ``BLAZE_DEFAULT_MAX_JOBS``)."""
    key = _new_key(tenant=tenant, name=name, admin=admin, rate=rate, max_jobs=max_jobs, max_priority=max_priority)
    secret = new_secret()
    with client.pipeline(transaction=True) as pipe:
        _queue_create(pipe, Keys(settings.redis_prefix), secret, key)
        pipe.execute()
    stored = _decode(_fields(key), settings)
    assert stored is not None
    return secret, stored


def get_key(client: redis.Redis, settings: Settings, key_or_id: str) -> ApiKey | None:
    """The key with this id (or secret); None if there is none."""
    keys = Keys(settings.redis_prefix)
    where = _Where.of(keys, key_or_id)
    pair = where.pair(client.hget(where.key, where.field))
    return _decode(client.hgetall(keys.api_key(pair[1])), settings) if pair else None


def list_keys(client: redis.Redis, settings: Settings, tenant: str | None = None) -> list[ApiKey]:
    """Every key (of ``tenant``, if given), by tenant and age; never a secret."""
    keys = Keys(settings.redis_prefix)
    hashes = client.hvals(keys.api_key_ids)
    with client.pipeline(transaction=False) as pipe:
        for hashed in hashes:
            pipe.hgetall(keys.api_key(text(hashed)))
        return _sorted([_decode(raw, settings) for raw in pipe.execute()], tenant)


def revoke_key(client: redis.Redis, settings: Settings, key_or_id: str) -> ApiKey | None:
    """End a key, given its secret or its id: what it was, or None if there was none. API
    processes that cached it stop taking it within ``BLAZE_KEY_CACHE_S``."""
    keys = Keys(settings.redis_prefix)
    where = _Where.of(keys, key_or_id)
    pair = where.pair(client.hget(where.key, where.field))
    if pair is None:
        return None
    with client.pipeline(transaction=True) as pipe:
        _queue_revoke(pipe, keys, *pair)
        return _decode(pipe.execute()[0], settings)


def update_key(client: redis.Redis, settings: Settings, key_or_id: str, changes: Mapping[str, Any]) -> ApiKey | None:
    """Change a key's limits (``rate``, ``max_jobs``, ``max_priority``; None: back to the
    deployment's default): the key as it is now, or None if there is none."""
    checked = check_limits(changes)
    keys = Keys(settings.redis_prefix)
    where = _Where.of(keys, key_or_id)
    pair = where.pair(client.hget(where.key, where.field))
    if pair is None:
        return None
    script_keys, args = _update_args(keys, pair[1], checked)
    return _decode(_pairs(scripts.script(client, "key_update")(keys=script_keys, args=args)), settings)


# --- asyncio (the API) --------------------------------------------------------------------


async def lookup(client: redis.asyncio.Redis, settings: Settings, secret: str) -> ApiKey | None:
    """The key whose secret this is; None for an unknown or revoked one. One round trip."""
    return _decode(await client.hgetall(Keys(settings.redis_prefix).api_key(key_hash(secret))), settings)


async def create_key_async(
    client: redis.asyncio.Redis,
    settings: Settings,
    *,
    tenant: str,
    name: str,
    admin: bool = False,
    rate: str | None = None,
    max_jobs: int | None = None,
    max_priority: int | None = None,
) -> tuple[str, ApiKey]:
    """``create_key`` for the API's client."""
    key = _new_key(tenant=tenant, name=name, admin=admin, rate=rate, max_jobs=max_jobs, max_priority=max_priority)
    secret = new_secret()
    async with client.pipeline(transaction=True) as pipe:
        _queue_create(pipe, Keys(settings.redis_prefix), secret, key)
        await pipe.execute()
    stored = _decode(_fields(key), settings)
    assert stored is not None
    return secret, stored


async def get_key_async(client: redis.asyncio.Redis, settings: Settings, key_or_id: str) -> ApiKey | None:
    """``get_key`` for the API's client."""
    keys = Keys(settings.redis_prefix)
    where = _Where.of(keys, key_or_id)
    pair = where.pair(await client.hget(where.key, where.field))
    return _decode(await client.hgetall(keys.api_key(pair[1])), settings) if pair else None


async def list_keys_async(client: redis.asyncio.Redis, settings: Settings, tenant: str | None = None) -> list[ApiKey]:
    """``list_keys`` for the API's client."""
    keys = Keys(settings.redis_prefix)
    hashes = await client.hvals(keys.api_key_ids)
    async with client.pipeline(transaction=False) as pipe:
        for hashed in hashes:
            pipe.hgetall(keys.api_key(text(hashed)))
        return _sorted([_decode(raw, settings) for raw in await pipe.execute()], tenant)


async def revoke_key_async(client: redis.asyncio.Redis, settings: Settings, key_or_id: str) -> ApiKey | None:
    """``revoke_key`` for the API's client."""
    keys = Keys(settings.redis_prefix)
    where = _Where.of(keys, key_or_id)
    pair = where.pair(await client.hget(where.key, where.field))
    if pair is None:
        return None
    async with client.pipeline(transaction=True) as pipe:
        _queue_revoke(pipe, keys, *pair)
        return _decode((await pipe.execute())[0], settings)


async def update_key_async(
    client: redis.asyncio.Redis, settings: Settings, key_or_id: str, changes: Mapping[str, Any]
) -> ApiKey | None:
    """``update_key`` for the API's client."""
    checked = check_limits(changes)
    keys = Keys(settings.redis_prefix)
    where = _Where.of(keys, key_or_id)
    pair = where.pair(await client.hget(where.key, where.field))
    if pair is None:
        return None
    script_keys, args = _update_args(keys, pair[1], checked)
    return _decode(_pairs(await scripts.script(client, "key_update")(keys=script_keys, args=args)), settings)
