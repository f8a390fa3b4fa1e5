"""A new job's input images (``input.image``, ``input.mask``), checked at create: their form,
a data URI's bytes and pixels (from the header, nothing decoded), an artifact's owner (the
caller's tenant, or it does not exist), and an https URL's host (public addresses only,
unless ``BLAZE_WEBHOOK_ALLOW_PRIVATE``, as webhooks). The worker checks the bytes, the pixels
and the address again as it fetches (``blaze_jobs.input_images``)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from blaze_jobs.addresses import WebhookRefused, check_addresses
from blaze_jobs.engines.diffusion_input import DiffusionInput
from blaze_jobs.errors import RequestError
from blaze_jobs.input_images import decode_data_uri, open_image, parse_source
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings

from .problems import InputProblem


async def check(request: Request, body: Any, *, tenant: str, settings: Settings) -> None:
    """Refuse with a 422 naming the field an input image the job could never read."""
    job = body.input
    if not isinstance(job, DiffusionInput):  # other engines' inputs may hold an "image" of their own
        return
    image = job.image
    if image is None:
        for name in ("mask", "strength"):
            if getattr(job, name, None) is not None:
                raise InputProblem(f"input.{name}", "needs input.image")
        return
    for name in ("image", "mask"):
        value = getattr(job, name, None)
        if value is not None:
            await _check_one(request, f"input.{name}", value, tenant=tenant, settings=settings)


async def _check_one(request: Request, field: str, value: str, *, tenant: str, settings: Settings) -> None:
    try:
        source = parse_source(field, value)
        if source.kind == "data":
            await run_in_threadpool(_check_data, field, source.value, settings)
    except RequestError as error:
        raise InputProblem(field, str(error).removeprefix(f"{field}: ")) from None
    if source.kind == "artifact":
        owners = Keys(settings.redis_prefix).artifact_owners(source.value)
        # Another tenant's artifact reads as one that does not exist: never tell it does.
        if not await request.app.state.redis.sismember(owners, tenant):
            raise InputProblem(field, "no such artifact")
    elif source.kind == "https" and not settings.webhook_allow_private:
        await _check_host(field, value, settings)


def _check_data(field: str, uri: str, settings: Settings) -> None:
    data = decode_data_uri(field, uri, max_bytes=settings.max_input_image_bytes)
    open_image(field, data, max_pixels=settings.max_input_image_pixels).close()


async def _check_host(field: str, url: str, settings: Settings) -> None:
    """As a webhook URL's (``api/webhooks.py``): the host resolves, to public addresses only."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or 443
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            resolving = asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            infos = await asyncio.wait_for(resolving, settings.webhook_dns_timeout_s)
            addresses = [str(info[4][0]) for info in infos]
        check_addresses(host, addresses)
    except ValueError:
        raise InputProblem(field, "the URL's port is not a number") from None
    except (socket.gaierror, asyncio.TimeoutError):
        raise InputProblem(field, f"{host} does not resolve") from None
    except WebhookRefused as refused:
        raise InputProblem(field, str(refused)) from None
