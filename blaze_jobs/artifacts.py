"""Artifacts: the files jobs produce, stored content-addressed and served at stable URLs.

Redis is the default store (it works across hosts with nothing else to run); a shared
filesystem is the other (``BLAZE_ARTIFACT_DIR``). A key is ``<sha256>.<extension>``, so the
same bytes are stored once whichever job made them.

A stored output names its artifacts by bare path (``/v1/artifacts/<key>``: the cache relies
on it); a job view signs each one (``UrlSigner``) with an expiry at the job's, so a browser or
a webhook receiver fetches it without a key. Without a signature the API serves an artifact
only to a tenant that owns a job pointing at it (``Keys.artifact_owners``, written where an
output is stored or a cache hit shows it again): a content hash alone reads nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Literal

import redis

from blaze_jobs.engines import SPECS
from blaze_jobs.keys import Keys
from blaze_jobs.records import EXPIRES, expires_at_ms
from blaze_jobs.settings import Settings

#: What the API serves each kind of artifact as, by extension: the kinds the engines'
#: specs declare, and JSON and text, which any engine may write.
CONTENT_TYPES = {
    **{kind.extension: kind.content_type for spec in SPECS for kind in spec.artifacts},
    "json": "application/json",
    "txt": "text/plain; charset=utf-8",
}
#: An artifact's key: its content's SHA-256 and extension. Check with ``fullmatch`` (and
#: anchored by ``\A``/``\Z``, not ``$``, which also takes a key with a trailing newline).
KEY_PATTERN = re.compile(r"\A[0-9a-f]{64}\.(" + "|".join(CONTENT_TYPES) + r")\Z")


def artifact_key(data: bytes, extension: str) -> str:
    return f"{hashlib.sha256(data).hexdigest()}.{extension}"


def artifact_url(key: str) -> str:
    """The path the API serves the artifact at."""
    return f"/v1/artifacts/{key}"


def content_type(key: str) -> str:
    return CONTENT_TYPES[key.rsplit(".", 1)[1]]


#: Where the API serves artifacts; a stored output's artifact URLs are this and a key.
ARTIFACT_PATH = artifact_url("")

#: What a signed URL's check finds: a signature that holds, one that does not, or one past its expiry.
Verdict = Literal["valid", "tampered", "expired"]


class UrlSigner:
    """Signs artifact URLs with the deployment's artifact URL secret: an HMAC-SHA256 of the
    key and the expiry (Unix seconds). One HMAC per URL and no Redis, since a page of jobs
    signs many."""

    def __init__(self, secret: str, *, ttl_s: int) -> None:
        self._mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
        #: The retention of a job whose record does not say when it expires.
        self.ttl_s = ttl_s

    def signature(self, key: str, expires: int) -> str:
        mac = self._mac.copy()
        mac.update(f"{key}\n{expires}".encode())
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()

    def signed_url(self, key: str, expires: int) -> str:
        """The artifact's path with its expiry and signature as query parameters."""
        return f"{ARTIFACT_PATH}{key}?expires={expires}&signature={self.signature(key, expires)}"

    def sign_path(self, path: str, expires: int) -> str | None:
        """``path`` signed, when it is an artifact's; None for any other URL."""
        key = artifact_name(path)
        return None if key is None else self.signed_url(key, expires)

    def check(self, key: str, *, expires: str | None, signature: str, now: float | None = None) -> Verdict:
        """Whether a signed URL's ``expires`` and ``signature`` hold for ``key``, and are current.
        The signature is checked first: an expiry is only worth reading once it is known genuine."""
        if expires is None or not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
            return "tampered"
        if not hmac.compare_digest(self.signature(key, int(expires)).encode(), signature.encode("utf-8", "replace")):
            return "tampered"
        return "valid" if int(expires) > (time.time() if now is None else now) else "expired"

    def expiry(self, record: dict[str, str]) -> int:
        """When a job's artifact URLs stop working (Unix seconds): when the job expires, never
        later. A record without its expiry (a webhook's snapshot, a job just made) counts from
        its creation, as the store does."""
        at_ms = record.get(EXPIRES)
        ms = int(at_ms) if at_ms else expires_at_ms(record["created_at"], self.ttl_s)
        return ms // 1000


def new_url_secret() -> str:
    return secrets.token_urlsafe(32)


#: The signer each deployment (Redis URL, prefix, secret setting, retention) has in this process.
_SIGNERS: dict[tuple[str, str, str, int], UrlSigner] = {}


def url_signer(client: redis.Redis, settings: Settings) -> UrlSigner:
    """The deployment's signer, loaded once per process: ``BLAZE_ARTIFACT_URL_SECRET``, or the
    secret the first process to need one generated and kept in Redis (``SET NX``, so every
    process signs with the same)."""
    memo = (settings.redis_url, settings.redis_prefix, settings.artifact_url_secret, settings.job_ttl_s)
    signer = _SIGNERS.get(memo)
    if signer is None:
        secret = settings.artifact_url_secret
        if not secret:
            name = Keys(settings.redis_prefix).artifact_url_secret
            client.set(name, new_url_secret(), nx=True)
            stored = client.get(name)  # set just above, if it was not
            secret = stored.decode() if isinstance(stored, bytes) else str(stored)
        signer = _SIGNERS[memo] = UrlSigner(secret, ttl_s=settings.job_ttl_s)
    return signer


def artifact_name(url: object) -> str | None:
    """The key of the artifact a stored output's URL names; None for any other URL."""
    if isinstance(url, str) and url.startswith(ARTIFACT_PATH) and KEY_PATTERN.fullmatch(url[len(ARTIFACT_PATH) :]):
        return url[len(ARTIFACT_PATH) :]
    return None


def artifact_names(output: object) -> list[str]:
    """The key of every artifact an output refers to, wherever it sits (images, or any other
    file an engine makes): each is a ``{"url": "/v1/artifacts/<key>", …}``."""
    names: list[str] = []
    pending = [output]
    while pending:  # a stack, not recursion: an output may nest deeper than the recursion limit
        value = pending.pop()
        if isinstance(value, dict):
            name = artifact_name(value.get("url"))
            if name is not None:
                names.append(name)
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return list(dict.fromkeys(names))


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
