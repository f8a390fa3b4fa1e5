"""Webhooks as the API serves them: a new job's webhook URL (checked to lead to a public
address), the job's deliveries and their redelivery (for the job's tenant only), and the
tenant's signing secret receivers verify with, and its rotation. Deliveries themselves are
sent by the webhook workers (``blaze_jobs/webhooks.py``)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from datetime import datetime, timezone
from typing import Any

import redis.exceptions
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from blaze_jobs.addresses import WebhookRefused, check_addresses
from blaze_jobs.api_keys import ApiKey
from blaze_jobs.audit import record_async
from blaze_jobs.deliveries import Delivery, DeliveryPage, delivery_list
from blaze_jobs.deliveries import redeliver as record_redelivery
from blaze_jobs.errors import JobNotFound
from blaze_jobs.records import tenant_of
from blaze_jobs.settings import Settings
from blaze_jobs.signing import TenantSecrets, fixed_secret, rotate_async, tenant_secrets_async

from .auth import Caller
from .problems import PROBLEM_JSON, PROBLEM_SCHEMA, InputProblem, problem
from .request_context import settings_of
from .responses import JSONResponse

PROBLEM = {"content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}, "description": "A problem+json body naming the fault."}

router = APIRouter()
log = logging.getLogger(__name__)


async def webhook_fields(body: Any, settings: Settings) -> dict[str, str]:
    """The job record's webhook fields, once the URL is known to lead to a public address
    (unless ``BLAZE_WEBHOOK_ALLOW_PRIVATE``); a 422 naming ``webhook`` otherwise."""
    if body.webhook is None:
        return {}
    if not settings.webhook_allow_private:
        host, port = body.webhook.host or "", body.webhook.port or 443
        try:
            try:
                addresses = [str(ipaddress.ip_address(host.strip("[]")))]
            except ValueError:
                loop = asyncio.get_running_loop()
                resolving = loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                infos = await asyncio.wait_for(resolving, settings.webhook_dns_timeout_s)
                addresses = [str(info[4][0]) for info in infos]
            check_addresses(host, addresses)
        except (socket.gaierror, asyncio.TimeoutError):
            raise InputProblem("webhook", f"{host} does not resolve") from None
        except WebhookRefused as refused:
            raise InputProblem("webhook", str(refused)) from None
    return {"webhook": str(body.webhook), "webhook_events": ",".join(dict.fromkeys(body.webhook_events_filter))}


class WebhookSecret(BaseModel):
    """The secrets a tenant's webhooks are signed with: verify with either."""

    secret: str = Field(description="The `whsec_` secret that signs every delivery from now on.")
    previous: str | None = Field(
        None,
        description="During a rotation's grace period, the secret it replaced: deliveries carry a "
        "signature by each, space-separated in `webhook-signature`. Null otherwise.",
    )
    previous_until: datetime | None = Field(None, description="When `previous` stops signing deliveries.")


def _secret_view(found: TenantSecrets) -> JSONResponse:
    until = None if found.previous_until is None else datetime.fromtimestamp(found.previous_until, tz=timezone.utc)
    view = WebhookSecret(secret=found.secret, previous=found.previous, previous_until=until)
    return JSONResponse(view.model_dump(mode="json"))


async def _own_job(request: Request, caller: ApiKey, job_id: str, *reads: str) -> list[Any]:
    """The replies of ``reads`` (Redis hash reads of keys named by the job id, such as its
    deliveries) in the pipeline that finds the job; JobNotFound for a job that is missing or
    another tenant's (a 404: never tell that it exists)."""
    store = request.app.state.store
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.exists(store.keys.job(job_id))
        pipe.hget(store.keys.job(job_id), "tenant")
        for key in reads:
            pipe.hgetall(key)
        exists, tenant, *replies = await pipe.execute()
    if not exists or tenant_of(tenant, settings_of(request.app)) != caller.tenant:
        raise JobNotFound(job_id)
    return replies


@router.get("/v1/jobs/{job_id}/deliveries", response_model=DeliveryPage, responses={401: PROBLEM, 404: PROBLEM})
async def list_deliveries(request: Request, caller: Caller, job_id: str) -> JSONResponse:
    """Every webhook delivery of the job, oldest first, with each attempt: when, the
    receiver's status code or the error, and how long it took."""
    (raw,) = await _own_job(request, caller, job_id, request.app.state.store.keys.deliveries(job_id))
    return JSONResponse({"deliveries": delivery_list(raw)})


@router.post(
    "/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver",
    status_code=202,
    response_model=Delivery,
    responses={401: PROBLEM, 404: PROBLEM},
)
async def redeliver(request: Request, caller: Caller, job_id: str, delivery_id: str) -> Response:
    """Send a delivery's event again: a new delivery with the same `webhook-id` and body. It
    also lifts a receiver's earlier `410 Gone` for the job."""
    store = request.app.state.store
    await _own_job(request, caller, job_id)  # first: another tenant's job must not be sent again
    reply = await record_redelivery(store.redis, store.keys, job_id, delivery_id)
    if reply is None:
        return problem(404, "Delivery not found", f"job {job_id} has no delivery {delivery_id!r}")
    (delivery,) = delivery_list({"new": reply})
    return JSONResponse(delivery, status_code=202)


@router.get("/v1/webhooks/secret", response_model=WebhookSecret, responses={401: PROBLEM})
async def webhook_secret(request: Request, caller: Caller) -> JSONResponse:
    """The `whsec_` secret the caller's tenant's webhooks are signed with, for receivers to
    verify them; during a rotation's grace period also the one it replaced, and until when.
    Any key of the tenant may read it: each tenant has its own."""
    return _secret_view(await tenant_secrets_async(request.app.state.store.redis, settings_of(request.app), caller.tenant))


@router.get("/v1/webhooks/default/secret", responses={401: PROBLEM})
async def default_webhook_secret(request: Request, caller: Caller) -> JSONResponse:
    """The caller's tenant's current `whsec_` secret as Replicate's API answers it,
    `{"key": ...}`, which `replicate.webhooks.validate` checks deliveries with."""
    found = await tenant_secrets_async(request.app.state.store.redis, settings_of(request.app), caller.tenant)
    return JSONResponse({"key": found.secret})


@router.post("/v1/webhooks/secret/rotate", response_model=WebhookSecret, responses={401: PROBLEM, 409: PROBLEM, 422: PROBLEM})
async def rotate_webhook_secret(
    request: Request,
    caller: Caller,
    # A default, not Annotated: its upper bound is a setting, applied below.
    grace_s: float | None = Query(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Seconds the replaced secret keeps signing beside the new one, from 0 to "
        "`BLAZE_WEBHOOK_SECRET_GRACE_S` (its default; a longer one is cut to it). After a leak, 0: "
        "the old secret stops at once.",
    ),
) -> Response:
    """Give the caller's tenant a new `whsec_` secret. The old one keeps signing beside it for
    `grace_s` seconds (`BLAZE_WEBHOOK_SECRET_GRACE_S`, a day, by default), so receivers switch
    without losing an event; a second rotation within that period ends it for the oldest secret.

    **After a leak, rotate with `grace_s=0`**: otherwise whoever holds the leaked secret can
    still sign forged webhooks that receivers accept for the whole grace period. With 0 the old
    secret is dropped at once (webhook workers stop signing with it within 2 s, the time they
    keep a secret), so receivers must switch to the new secret now; deliveries they refuse
    meanwhile are retried, or sent again with redeliver.

    Any key of the tenant may rotate its secret (every one can read it, and a leaked secret
    must be replaceable without an operator); an admin key rotates its own tenant's only. Each
    rotation is audited. The default tenant's secret, when `BLAZE_WEBHOOK_SECRET` sets it,
    changes with that setting only: a 409."""
    settings = settings_of(request.app)
    if grace_s is not None:  # a longer grace than the deployment allows is cut to it
        grace_s = min(grace_s, settings.webhook_secret_grace_s)
    if fixed_secret(settings, caller.tenant):
        return problem(
            409,
            "Webhook secret set by the deployment",
            f"tenant {caller.tenant}'s webhook secret is BLAZE_WEBHOOK_SECRET: change that setting to change it",
        )
    client = request.app.state.store.redis
    rotated = await rotate_async(client, settings, caller.tenant, grace_s=grace_s)
    address = request.client.host if request.client else None
    try:
        await record_async(client, settings, key=caller, action="webhook_secret.rotate", target=caller.tenant, address=address)
    except redis.exceptions.RedisError as error:
        # The secret is rotated already: an error now would hide it from its caller, whose
        # retry would rotate again and end the replaced secret's grace period early.
        log.error(
            "tenant %s's webhook secret rotated by key %s, but its audit entry was not written: %s",
            caller.tenant,
            caller.id,
            error,
        )
    return _secret_view(rotated)
