"""Artifacts: the files jobs produce, stored content-addressed and served at stable URLs.

Redis is the default store (it works across hosts with nothing else to run); a shared
filesystem is the other (``BLAZE_ARTIFACT_DIR``). A key is ``<sha256>.<extension>``, so the
same bytes are stored once whichever job made them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import redis

from blaze_jobs.engines import SPECS
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings

#: What the API serves each kind of artifact as, by extension: the kinds the engines'
#: specs declare, and JSON and text, which any engine may write.
CONTENT_TYPES = {
    **{kind.extension: kind.content_type for spec in SPECS for kind in spec.artifacts},
    "json": "application/json",
    "txt": "text/plain; charset=utf-8",
}
KEY_PATTERN = re.compile(r"^[0-9a-f]{64}\.(" + "|".join(CONTENT_TYPES) + r")$")


def artifact_key(data: bytes, extension: str) -> str:
    return f"{hashlib.sha256(data).hexdigest()}.{extension}"


def artifact_url(key: str) -> str:
    """The path the API serves the artifact at."""
    return f"/v1/artifacts/{key}"


def content_type(key: str) -> str:
    return CONTENT_TYPES[key.rsplit(".", 1)[1]]


class ArtifactStore:
    """Where artifacts live. ``put`` returns the key; ``get`` returns the bytes or None."""

    def put(self, data: bytes, extension: str) -> str:
        raise NotImplementedError

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError


class RedisArtifactStore(ArtifactStore):
    def __init__(self, client: redis.Redis, *, prefix: str, ttl_s: int) -> None:
        self.redis = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s

    def put(self, data: bytes, extension: str) -> str:
        key = artifact_key(data, extension)
        # Writing the same content again only renews its TTL to cover the newest job.
        self.redis.set(self.keys.artifact(key), data, ex=self.ttl_s)
        return key

    def get(self, key: str) -> bytes | None:
        data = self.redis.get(self.keys.artifact(key))
        if isinstance(data, str):
            raise TypeError("the artifact store's Redis client decodes replies to text; artifacts are bytes")
        return data


class FilesystemArtifactStore(ArtifactStore):
    """Artifacts as files under one directory, which several hosts may share (NFS, a volume).
    Nothing expires them: a deployment prunes the directory by age."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, data: bytes, extension: str) -> str:
        key = artifact_key(data, extension)
        path = self.root / key[:2] / key
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a reader never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return key

    def get(self, key: str) -> bytes | None:
        path = self.root / key[:2] / key
        return path.read_bytes() if path.is_file() else None


def artifact_store(settings: Settings, client: redis.Redis) -> ArtifactStore:
    """The store this deployment is configured for."""
    if settings.artifact_dir:
        return FilesystemArtifactStore(settings.artifact_dir)
    return RedisArtifactStore(client, prefix=settings.redis_prefix, ttl_s=settings.job_ttl_s)
