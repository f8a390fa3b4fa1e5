"""Files a tenant uploads (a batch's input) and the files a batch writes (its output and
errors), kept in Redis for ``BLAZE_FILE_TTL_S``, as OpenAI's Files API describes them.

A file is two keys: its description (``keys.Keys.file``, a hash: tenant, filename, purpose,
bytes, created and expiry times) and its bytes (``keys.Keys.file_content``), both with the
same expiry; the tenant's index of files (``keys.Keys.tenant_files``) is scored by creation
time for listing, newest first. Another tenant's file is as missing as a deleted one.

A tenant keeps at most ``BLAZE_FILE_QUOTA_BYTES`` of live files. Its files' sizes are entries
``<file id>:<bytes>`` of a sorted set scored by expiry (``keys.Keys.tenant_file_sizes``) and
their sum a counter beside it (``keys.Keys.tenant_file_bytes``), changed only in the same
transaction as the entries: a put first drops the expired entries (and their bytes), so what
it counts is the live files', and a delete drops its file's. A batch's output and error files
count too, and are kept even past the quota (the work is done; the next upload is refused).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis.asyncio
import redis.exceptions

from blaze_jobs.keys import Keys
from blaze_jobs.records import decode, score_of, text
from blaze_jobs.settings import Settings

#: What a file id looks like (OpenAI's own are ``file-`` and 24 characters).
ID_PREFIX = "file-"


#: How often a put or delete is tried when another one of the tenant's changed its files meanwhile.
ATTEMPTS = 20
#: Expired size entries one put drops at most (the rest are dropped by the next puts; until
#: then they count, so a tenant is refused early, never late).
TRIM_AT_MOST = 10_000


class FileNotFound(Exception):
    """No file of the caller's tenant with this id (never made, deleted, or expired)."""


class FileQuotaFull(Exception):
    """The tenant's live files and this one would pass ``BLAZE_FILE_QUOTA_BYTES``."""

    def __init__(self, *, used: int, size: int, quota: int) -> None:
        super().__init__(f"the tenant's files hold {used} bytes; this file's {size} would pass its quota of {quota}")
        self.used, self.size, self.quota = used, size, quota


def new_file_id() -> str:
    return ID_PREFIX + uuid.uuid4().hex[:24]


def file_view(meta: dict[str, str]) -> dict[str, Any]:
    """The file as OpenAI's ``FileObject`` describes it."""
    return {
        "id": meta["id"],
        "object": "file",
        "bytes": int(meta["bytes"]),
        "created_at": int(float(meta["created_at"])),
        "expires_at": int(float(meta["expires_at"])),
        "filename": meta["filename"],
        "purpose": meta["purpose"],
        "status": "processed",
        "status_details": None,
    }


def queue_put(
    pipe: Any,
    keys: Keys,
    *,
    tenant: str,
    filename: str,
    purpose: str,
    content: bytes,
    ttl_s: int,
    index_ttl_s: int,
    file_id: str | None = None,
) -> dict[str, str]:
    """Queue on a pipeline (a transaction) the commands that store a new file of ``tenant``
    and count its bytes; returns its description. ``index_ttl_s``: the longest any file is
    kept, how long the tenant's indexes outlive their last put."""
    now = time.time()
    meta = {
        "id": file_id or new_file_id(),
        "tenant": tenant,
        "filename": filename,
        "purpose": purpose,
        "bytes": str(len(content)),
        "created_at": repr(now),
        "expires_at": repr(now + ttl_s),
    }
    pipe.hset(keys.file(meta["id"]), mapping=meta)
    pipe.expire(keys.file(meta["id"]), ttl_s)
    pipe.set(keys.file_content(meta["id"]), content, ex=ttl_s)
    pipe.zadd(keys.tenant_files(tenant), {meta["id"]: score_of(now)})
    pipe.zadd(keys.tenant_file_sizes(tenant), {f"{meta['id']}:{len(content)}": now + ttl_s})
    pipe.incrby(keys.tenant_file_bytes(tenant), len(content))
    for index in (keys.tenant_files(tenant), keys.tenant_file_sizes(tenant), keys.tenant_file_bytes(tenant)):
        pipe.expire(index, index_ttl_s)
    return meta


def size_of(entry: str) -> int:
    """The bytes a size entry (``<file id>:<bytes>``) counts."""
    return int(entry.rpartition(":")[2])


async def put(client: redis.asyncio.Redis, settings: Settings, *, ttl_s: int | None = None, **file: Any) -> dict[str, str]:
    """Store a new file (``queue_put``'s arguments) of ``file["tenant"]``, kept ``ttl_s``
    (``BLAZE_FILE_TTL_S`` by default), within the tenant's quota; its description.
    FileQuotaFull when its live files and this one would pass ``BLAZE_FILE_QUOTA_BYTES``."""
    keys = Keys(settings.redis_prefix)
    tenant, size = file["tenant"], len(file["content"])
    sizes, total = keys.tenant_file_sizes(tenant), keys.tenant_file_bytes(tenant)
    for _ in range(ATTEMPTS):
        async with client.pipeline(transaction=True) as pipe:
            # The count is read, its expired entries dropped and the file stored in one
            # transaction: another put or delete of the tenant's meanwhile makes it again.
            await pipe.watch(sizes, total)
            now = time.time()
            expired = [text(entry) for entry in await pipe.zrangebyscore(sizes, "-inf", now, start=0, num=TRIM_AT_MOST)]
            used = int(await pipe.get(total) or 0) - sum(size_of(entry) for entry in expired)
            if used + size > settings.file_quota_bytes:
                await pipe.reset()
                raise FileQuotaFull(used=used, size=size, quota=settings.file_quota_bytes)
            pipe.multi()
            if expired:
                pipe.zrem(sizes, *expired)
                pipe.decrby(total, sum(size_of(entry) for entry in expired))
                pipe.zrem(keys.tenant_files(tenant), *(entry.rpartition(":")[0] for entry in expired))
            pipe.zremrangebyscore(keys.tenant_files(tenant), "-inf", f"({score_of(now - settings.file_ttl_s)}")
            meta = queue_put(pipe, keys, ttl_s=ttl_s or settings.file_ttl_s, index_ttl_s=settings.file_ttl_s, **file)
            try:
                await pipe.execute()
            except redis.exceptions.WatchError:
                continue
            return meta
    raise redis.exceptions.WatchError(f"tenant {tenant}'s files kept changing; the file was not stored")


async def describe(client: redis.asyncio.Redis, settings: Settings, file_id: str, *, tenant: str) -> dict[str, str]:
    """The description of ``tenant``'s file; FileNotFound for a missing one or another tenant's."""
    meta = decode(await client.hgetall(Keys(settings.redis_prefix).file(file_id)))
    if not meta or meta.get("tenant") != tenant:
        raise FileNotFound(file_id)
    return meta


async def content(client: redis.asyncio.Redis, settings: Settings, file_id: str, *, tenant: str) -> bytes:
    """The bytes of ``tenant``'s file; FileNotFound as ``describe``."""
    keys = Keys(settings.redis_prefix)
    async with client.pipeline(transaction=False) as pipe:
        pipe.hget(keys.file(file_id), "tenant")
        pipe.get(keys.file_content(file_id))
        owner, data = await pipe.execute()
    if owner is None or text(owner) != tenant or data is None:
        raise FileNotFound(file_id)
    return bytes(data)


async def delete(client: redis.asyncio.Redis, settings: Settings, file_id: str, *, tenant: str) -> None:
    """Delete ``tenant``'s file; FileNotFound as ``describe``."""
    meta = await describe(client, settings, file_id, tenant=tenant)
    keys = Keys(settings.redis_prefix)
    sizes, entry = keys.tenant_file_sizes(tenant), f"{file_id}:{meta['bytes']}"
    for _ in range(ATTEMPTS):
        async with client.pipeline(transaction=True) as pipe:
            # Its bytes leave the count with its entry, only if a put has not dropped it already.
            await pipe.watch(sizes)
            counted = await pipe.zscore(sizes, entry) is not None
            pipe.multi()
            pipe.unlink(keys.file(file_id), keys.file_content(file_id))
            pipe.zrem(keys.tenant_files(tenant), file_id)
            if counted:
                pipe.zrem(sizes, entry)
                pipe.decrby(keys.tenant_file_bytes(tenant), int(meta["bytes"]))
            try:
                await pipe.execute()
            except redis.exceptions.WatchError:
                continue
            return
    raise redis.exceptions.WatchError(f"tenant {tenant}'s files kept changing; file {file_id} was not deleted")


async def page(
    client: redis.asyncio.Redis,
    settings: Settings,
    *,
    tenant: str,
    after: str | None,
    limit: int,
    purpose: str | None = None,
    order: str = "desc",
) -> tuple[list[dict[str, str]], bool]:
    """A page of ``tenant``'s files after the file ``after`` (newest first, or oldest first
    with ``order="asc"``), and whether more follow."""
    keys = Keys(settings.redis_prefix)
    index = keys.tenant_files(tenant)
    # Entries outlive their files by at most a retention: drop them as the index is read.
    await client.zremrangebyscore(index, "-inf", f"({score_of(time.time() - settings.file_ttl_s)}")
    return await index_page(
        client, index, keys.file, after=after, limit=limit, order=order, keep=lambda m: not purpose or m.get("purpose") == purpose
    )


async def index_page(
    client: redis.asyncio.Redis,
    index: str,
    key_of: Any,
    *,
    after: str | None,
    limit: int,
    order: str,
    keep: Any = None,
) -> tuple[list[dict[str, str]], bool]:
    """A page of the hashes (``key_of(id)``) a sorted set indexes, starting after the member
    ``after`` (an id the index no longer holds starts from the beginning), newest first
    (``order="desc"``) or oldest first; and whether more follow. ``keep`` filters them."""
    start = 0
    if after:
        rank: Any = await (client.zrevrank(index, after) if order == "desc" else client.zrank(index, after))
        start = 0 if rank is None else int(rank) + 1
    found: list[dict[str, str]] = []
    more = False
    while len(found) <= limit:
        read = limit + 1
        end = start + read - 1
        ids = await (client.zrevrange(index, start, end) if order == "desc" else client.zrange(index, start, end))
        if not ids:
            break
        async with client.pipeline(transaction=False) as pipe:
            for member in ids:
                pipe.hgetall(key_of(text(member)))
            raws = await pipe.execute()
        for raw in raws:
            meta = decode(raw)
            if meta and (keep is None or keep(meta)):
                found.append(meta)
        start += len(ids)
        if len(ids) < read:
            break
    if len(found) > limit:
        more = True
    return found[:limit], more
