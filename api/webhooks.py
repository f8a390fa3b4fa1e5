"""Webhooks as the API serves them: a new job's webhook URL (checked to lead to a public
address), the job's deliveries and their redelivery, and the signing secret receivers
verify with. Deliveries themselves are sent by the webhook workers (``blaze_jobs/webhooks.py``)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from blaze_jobs.addresses import WebhookRefused, check_addresses
from blaze_jobs.deliveries import Delivery, DeliveryPage, delivery_list
from blaze_jobs.deliveries import redeliver as record_redelivery
from blaze_jobs.errors import JobNotFound
from blaze_jobs.settings import Settings
from blaze_jobs.signing import signing_secret_async

from .problems import PROBLEM_JSON, PROBLEM_SCHEMA, InputProblem, problem
from .request_context import settings_of
from .responses import JSONResponse

PROBLEM = {"content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}, "description": "A problem+json body naming the fault."}

router = APIRouter()


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


@router.get("/v1/jobs/{job_id}/deliveries", response_model=DeliveryPage, responses={404: PROBLEM})
async def list_deliveries(request: Request, job_id: str) -> JSONResponse:
    """Every webhook delivery of the job, oldest first, with each attempt: when, the
    receiver's status code or the error, and how long it took."""
    store = request.app.state.store
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.exists(store.keys.job(job_id))
        pipe.hgetall(store.keys.deliveries(job_id))
        exists, raw = await pipe.execute()
    if not exists:
        raise JobNotFound(job_id)
    return JSONResponse({"deliveries": delivery_list(raw)})


@router.post(
    "/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver", status_code=202, response_model=Delivery, responses={404: PROBLEM}
)
async def redeliver(request: Request, job_id: str, delivery_id: str) -> Response:
    """Send a delivery's event again: a new delivery with the same `webhook-id` and body. It
    also lifts a receiver's earlier `410 Gone` for the job."""
    store = request.app.state.store
    reply = await record_redelivery(store.redis, store.keys, job_id, delivery_id)
    if reply is None:
        await store.get(job_id)  # 404 for the job first
        return problem(404, "Delivery not found", f"job {job_id} has no delivery {delivery_id!r}")
    (delivery,) = delivery_list({"new": reply})
    return JSONResponse(delivery, status_code=202)


@router.get("/v1/webhooks/secret", responses={401: PROBLEM, 403: PROBLEM})
async def webhook_secret(request: Request, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
    """The `whsec_` secret webhooks are signed with, for receivers to verify them. Needs
    `Authorization: Bearer <BLAZE_ADMIN_TOKEN>`; with no token configured, nobody gets it
    (never by the caller's address: a forwarded header can claim any)."""
    settings = settings_of(request.app)
    if not settings.admin_token:
        raise HTTPException(
            403,
            "the webhook secret needs an admin token: set BLAZE_ADMIN_TOKEN on the API and send Authorization: Bearer <token>",
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.admin_token.encode()):
        raise HTTPException(
            401,
            "a valid admin token is required: send Authorization: Bearer <BLAZE_ADMIN_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return JSONResponse({"secret": await signing_secret_async(request.app.state.store.redis, settings)})
