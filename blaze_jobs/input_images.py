"""Input images of a diffusion job (``input.image``, ``input.mask``): read from where the
request names them, within the deployment's bounds.

A request names an image in one of three forms: a ``data:`` URI of a PNG, JPEG or WebP; an
artifact of an earlier job (its ``/v1/artifacts/<key>`` path as a job's output gives it,
with or without the signed query, or an absolute URL whose path is that); or an ``https``
URL, fetched as webhooks are sent (``webhook_client``: no redirects, no proxies, a time in
all, and public addresses only unless ``BLAZE_WEBHOOK_ALLOW_PRIVATE``), its bytes bounded as
they arrive. The API checks what it can at create (``api/input_images.py``); the worker
fetches and decodes here, in the job's task thread, before the job reaches the device.

Pixels are bounded from the image's header, before they are decoded: a small PNG may
declare a huge canvas (a decompression bomb). Only the parsing is imported at module level:
PIL, httpx and Redis load on first use, so the API reads the engine's module cheaply.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote_to_bytes, urlsplit

from blaze_jobs.errors import RequestError, WorkerFault

if TYPE_CHECKING:
    import httpx
    import redis
    from PIL import Image

    from blaze_jobs.artifacts import ArtifactStore
    from blaze_jobs.engines.base import EngineRequest
    from blaze_jobs.settings import Settings

#: The media types a ``data:`` URI may carry, and the formats PIL must find in the bytes.
MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
FORMATS = frozenset(MEDIA_TYPES.values())
ARTIFACT_PREFIX = "/v1/artifacts/"
#: An image artifact's key: the SHA-256 of its bytes and the extension the diffusion engine writes.
_ARTIFACT_KEY = re.compile(r"\A[0-9a-f]{64}\.(png|jpeg|webp)\Z")
_FORMS = "an https URL, a data: URI of a PNG, JPEG or WebP image, or an earlier job's /v1/artifacts/<key> URL"

#: The input fields that name images, and the PIL mode each is read in (a mask: white repaints).
FIELDS = (("image", "RGB"), ("mask", "L"))


@dataclass(frozen=True)
class Source:
    """Where an input image comes from: a data URI (``value`` is the URI), an artifact
    (``value`` is its key) or an https URL (``value`` is the URL)."""

    kind: Literal["data", "artifact", "https"]
    value: str


def parse_source(field: str, value: Any) -> Source:
    """The source ``value`` names; ``RequestError`` naming ``field`` for any other form."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{field}: must be {_FORMS}")
    if value[:5].lower() == "data:":
        return Source("data", value)
    if value.startswith(ARTIFACT_PREFIX):
        return Source("artifact", _artifact_key(field, value.split("?", 1)[0]))
    try:
        parts = urlsplit(value)
    except ValueError:
        raise RequestError(f"{field}: must be {_FORMS}") from None
    if parts.scheme in ("http", "https") and parts.path.startswith(ARTIFACT_PREFIX):
        # The API's own URL of an artifact, as a client that prefixed its base URL holds it:
        # read from the store, never fetched, so the deployment's address is no matter.
        return Source("artifact", _artifact_key(field, parts.path))
    if parts.scheme == "https" and parts.hostname:
        return Source("https", value)
    raise RequestError(f"{field}: must be {_FORMS}, not a {parts.scheme or 'relative'} URL")


def _artifact_key(field: str, path: str) -> str:
    key = path[len(ARTIFACT_PREFIX) :]
    if not _ARTIFACT_KEY.fullmatch(key):
        raise RequestError(f"{field}: no such artifact")
    return key


def decode_data_uri(field: str, uri: str, *, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URI of an image, bounded before they are decoded."""
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise RequestError(f"{field}: a malformed data: URI (no comma before the data)")
    media_type, *params = (part.strip().lower() for part in header.split(";"))
    if media_type not in MEDIA_TYPES:
        raise RequestError(
            f"{field}: a data: URI must carry image/png, image/jpeg or image/webp, not {media_type or 'text/plain'!r}"
        )
    # Base64 takes 4 characters for 3 bytes: a payload this long is over the bound whatever it holds.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise RequestError(f"{field}: over the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True) if "base64" in params else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field}: a malformed data: URI (its data is not base64)") from None
    if len(data) > max_bytes:
        raise RequestError(f"{field}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    return data


def open_image(field: str, data: bytes, *, max_pixels: int) -> Image.Image:
    """The image ``data`` holds, its size read from the header and bounded; nothing decoded yet."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as bomb:  # PIL's own, far higher, bound
        raise RequestError(f"{field}: more pixels than the limit of {max_pixels} ({bomb})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(f"{field}: does not decode as a PNG, JPEG or WebP image") from None
    if image.format not in FORMATS:
        raise RequestError(f"{field}: a {image.format} image; PNG, JPEG or WebP only")
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(f"{field}: {width}x{height} exceeds the limit of {max_pixels} pixels")
    if width < 8 or height < 8:
        raise RequestError(f"{field}: {width}x{height} is smaller than 8x8 pixels")
    return image


def decoded(field: str, image: Image.Image, mode: str) -> Image.Image:
    """``image``'s pixels, upright as its EXIF orientation says, in ``mode``."""
    from PIL import ImageOps

    try:
        image.load()
        upright = ImageOps.exif_transpose(image) or image
        return upright.convert(mode)
    except Exception as error:  # a truncated or corrupt file: the bytes are the request's
        raise RequestError(f"{field}: does not decode as an image ({type(error).__name__}: {error})") from None


def fit(image: Image.Image, *, max_width: int, max_height: int, max_pixels: int) -> Image.Image:
    """``image`` scaled down, keeping its shape, until its size is a job size the deployment
    allows: a job without width and height takes its input image's size."""
    from PIL import Image

    width, height = image.size
    scale = min(1.0, max_width / width, max_height / height, (max_pixels / (width * height)) ** 0.5)
    if scale >= 1.0:
        return image
    size = (max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8))
    return image.resize(size, Image.Resampling.LANCZOS)


class InputImages:
    """Reads a request's input images into ``request.fetched``, in the worker."""

    def __init__(self, settings: Settings, *, artifacts: ArtifactStore | None = None) -> None:
        self.settings = settings
        self._artifacts = artifacts
        self._client: httpx.Client | None = None
        self._client_redis: redis.Redis | None = None
        self._lock = threading.Lock()

    def fetch(self, request: EngineRequest) -> None:
        """Fill ``request.fetched["image"]`` (RGB) and ``["mask"]`` (L) from the input, once."""
        data = request.input
        if data.get("mask") is not None and data.get("image") is None:
            raise RequestError("input.mask: needs input.image (the mask says which part of it to repaint)")
        for name, mode in FIELDS:
            value = data.get(name)
            if value is None or name in request.fetched:
                continue
            image = self.read(f"input.{name}", value, mode, tenant=request.tenant)
            if name == "image":
                settings = self.settings
                image = fit(image, max_width=settings.max_width, max_height=settings.max_height, max_pixels=settings.max_pixels)
            request.fetched[name] = image

    def read(self, field: str, value: Any, mode: str, *, tenant: str | None = None) -> Image.Image:
        """The image ``value`` names, decoded in ``mode``; ``RequestError`` naming ``field``.
        With ``tenant``, an artifact must be one of its jobs' (the API checked it at create;
        a path that made the job without the API's check meets it here)."""
        source = parse_source(field, value)
        max_bytes = self.settings.max_input_image_bytes
        if source.kind == "data":
            data = decode_data_uri(field, source.value, max_bytes=max_bytes)
        elif source.kind == "artifact":
            data = self._artifact(field, source.value, tenant)
        else:
            data = self._download(field, source.value)
        if len(data) > max_bytes:
            raise RequestError(f"{field}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
        return decoded(field, open_image(field, data, max_pixels=self.settings.max_input_image_pixels), mode)

    def _artifact(self, field: str, key: str, tenant: str | None) -> bytes:
        import redis

        from blaze_jobs.keys import Keys

        try:
            if tenant is not None and not self._redis().sismember(Keys(self.settings.redis_prefix).artifact_owners(key), tenant):
                raise RequestError(f"{field}: no such artifact")  # another tenant's reads as none at all
            data = self._store().get(key)
        except redis.RedisError as error:  # the worker cannot reach its store: not the request's fault
            raise WorkerFault(f"could not read {field}'s artifact: {error}") from error
        if data is None:  # its retention ran out (the API checked the caller owns it)
            raise RequestError(f"{field}: no such artifact (or its retention ran out)")
        return data

    def _redis(self) -> redis.Redis:
        with self._lock:
            if self._client_redis is None:
                import redis

                self._client_redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
            return self._client_redis

    def _store(self) -> ArtifactStore:
        if self._artifacts is None:
            from blaze_jobs.artifacts import artifact_store

            client = self._redis()
            with self._lock:
                if self._artifacts is None:
                    self._artifacts = artifact_store(self.settings, client)
        return self._artifacts

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                import httpx

                from blaze_jobs.webhook_client import DeliveryTransport

                self._client = httpx.Client(
                    transport=DeliveryTransport(public_only=not self.settings.webhook_allow_private),
                    timeout=self.settings.input_image_timeout_s,
                    follow_redirects=False,
                    # Identity only: the bytes bound counts what arrives, and a compressed body
                    # could inflate far past it once decoded.
                    headers={
                        "user-agent": "blaze-jobs-input-images/1",
                        "accept": "image/png, image/jpeg, image/webp",
                        "accept-encoding": "identity",
                    },
                )
            return self._client

    def _download(self, field: str, url: str) -> bytes:
        import httpx

        from blaze_jobs.webhook_client import time_limit

        host = urlsplit(url).hostname
        max_bytes = self.settings.max_input_image_bytes
        try:
            with time_limit(self.settings.input_image_timeout_s), self._http().stream("GET", url) as response:
                if response.is_redirect:
                    raise RequestError(f"{field}: {host} answered {response.status_code}, a redirect, which is not followed")
                if response.status_code != 200:
                    raise RequestError(f"{field}: {host} answered {response.status_code}")
                encoding = response.headers.get("content-encoding", "identity").lower()
                if encoding != "identity":
                    raise RequestError(f"{field}: {host} sent the image {encoding}-encoded; only unencoded bytes are read")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise RequestError(f"{field}: {declared} bytes exceeds the limit of {max_bytes} bytes")
                body = bytearray()
                for chunk in response.iter_raw():
                    body += chunk
                    if len(body) > max_bytes:  # stop reading: the rest is never fetched
                        raise RequestError(f"{field}: over the limit of {max_bytes} bytes")
                return bytes(body)
        except httpx.HTTPError as error:  # refused address, timeout, connection or protocol error
            raise RequestError(f"{field}: could not fetch from {host}: {type(error).__name__}: {error}") from None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
