"""Routes for admin keys only: make, list, change and revoke API keys, read the audit trail,
and see the workers. An admin key manages keys of every tenant, not only its own: it is the
deployment's operator (``BLAZE_ADMIN_TOKEN`` and ``blaze keys create --admin`` make one)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from blaze_jobs import api_keys, audit
from blaze_jobs.api_keys import ApiKey
from blaze_jobs.engines.spec import OptionalJSONInt
from blaze_jobs.heartbeat import workers_index
from blaze_jobs.keys import Keys
from blaze_jobs.records import text

from . import bounds, problems
from .auth import Admin, key_cache
from .problems import InputProblem
from .request_context import settings_of
from .responses import JSONResponse

PROBLEM = {
    "content": {problems.PROBLEM_JSON: {"schema": problems.PROBLEM_SCHEMA}},
    "description": "A problem+json body naming the fault.",
}
# Bodies are read as the create route reads them: bad UTF-8 or JSON is a 422 naming the body.
router = APIRouter(route_class=bounds.JSONBodyRoute, responses={401: PROBLEM, 403: PROBLEM})

Name = Annotated[str, Field(pattern=api_keys.NAME.pattern, min_length=1, max_length=64)]
Rate = Annotated[
    str | None,
    Field(
        pattern=api_keys.RATE.pattern,
        description="Requests allowed, in `limits` notation (`600/minute`, `10/second`), moving window; "
        "null: the deployment's `BLAZE_DEFAULT_RATE`.",
        examples=["600/minute"],
    ),
]


# Limits as fields, not Annotated types: a bound on an optional integer belongs to its field
# (see engines.spec.OptionalJSONInt).
def max_jobs_field() -> Any:
    return Field(
        None,
        ge=1,
        description="The tenant's jobs queued plus running that this key may reach (429 past it); "
        "null: the deployment's `BLAZE_DEFAULT_MAX_JOBS`.",
    )


def max_priority_field() -> Any:
    return Field(None, ge=0, description="The highest job `priority` this key may ask for; null: any.")


KeyId = Annotated[str, Path(pattern=api_keys.KEY_ID.pattern, description="The key's id (`key_…`), never its secret.")]


class KeyCreate(BaseModel):
    """A key to make."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tenant: Name = Field(description="The tenant the key acts for: its jobs, quota, cache and webhook secret.")
    name: Name = Field(description="What the key is for (`ci`, `alice`), to tell keys apart; need not be unique.")
    admin: bool = Field(False, description="An admin key may manage keys of every tenant, read the audit trail and see workers.")
    rate: Rate = None
    max_jobs: OptionalJSONInt = max_jobs_field()
    max_priority: OptionalJSONInt = max_priority_field()


class KeyUpdate(BaseModel):
    """Limits to change. A field left out stays as it is; null sets it back to the deployment's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rate: Rate = None
    max_jobs: OptionalJSONInt = max_jobs_field()
    max_priority: OptionalJSONInt = max_priority_field()


class KeyView(BaseModel):
    """A key as stored (never its secret), with the limits in force: its own, or the deployment's defaults."""

    id: str = Field(description="The key's public id, to revoke or change it without its secret.")
    tenant: str = Field(description="The tenant the key acts for.")
    name: str = Field(description="What the key is for.")
    admin: bool = Field(description="Whether it is an admin key.")
    rate: str | None = Field(description="Requests allowed (`limits` notation); null: not rate limited.")
    max_jobs: int | None = Field(description="The tenant's jobs queued plus running this key may reach; null: no quota.")
    max_priority: int | None = Field(description="The highest `priority` it may ask for; null: any.")
    created_at: float = Field(description="When it was made, Unix seconds.")


class KeyCreated(KeyView):
    """A new key, with its secret: shown this once, and stored nowhere (only its hash is)."""

    secret: str = Field(description="The key itself, to send as `Authorization: Bearer <secret>`.")


class KeyList(BaseModel):
    """Keys, by tenant and age."""

    keys: list[KeyView]


class AuditActor(BaseModel):
    """The key that acted."""

    key_id: str = Field(description="Its id (`admin-token` for BLAZE_ADMIN_TOKEN, `cli` for `blaze keys`).")
    name: str = Field(description="Its name.")
    tenant: str = Field(description="Its tenant.")


class AuditEntry(BaseModel):
    """One thing done."""

    id: str = Field(description="The entry's id in the trail (a Redis stream id).")
    at: float = Field(description="When, Unix seconds.")
    who: AuditActor
    tenant: str = Field(description="The tenant acted on.")
    action: str = Field(description=f"One of {', '.join(audit.ACTIONS)}.")
    target: str = Field(description="What was acted on: a key id, a job id, a tenant.")
    address: str | None = Field(
        description="The client's address as the request showed it (the host name, from the CLI); for the record only."
    )


class AuditPage(BaseModel):
    """Audit entries, newest first."""

    entries: list[AuditEntry]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


def view(key: ApiKey) -> dict[str, Any]:
    """What the API shows of a key."""
    return {
        "id": key.id,
        "tenant": key.tenant,
        "name": key.name,
        "admin": key.admin,
        "rate": key.rate,
        "max_jobs": key.max_jobs,
        "max_priority": key.max_priority,
        "created_at": key.created_at,
    }


def _address(request: Request) -> str | None:
    return request.client.host if request.client else None


def _not_found(key_id: str) -> Response:
    return problems.problem(404, "Key not found", f"no API key with id {key_id!r}")


@router.post("/v1/admin/keys", status_code=201, response_model=KeyCreated, responses={422: PROBLEM})
async def create_key(request: Request, caller: Admin, body: Annotated[KeyCreate, Body()]) -> JSONResponse:
    """Make a key for any tenant. Its secret is in this answer only: Redis keeps its hash."""
    settings = settings_of(request.app)
    client = request.app.state.redis
    try:
        secret, key = await api_keys.create_key_async(client, settings, **body.model_dump())
    except ValueError as error:
        field, _, why = str(error).partition(": ")
        raise InputProblem(field, why) from None
    await audit.record_async(
        client, settings, key=caller, action="key.create", target=key.id, tenant=key.tenant, address=_address(request)
    )
    return JSONResponse({**view(key), "secret": secret}, status_code=201)


@router.get("/v1/admin/keys", response_model=KeyList)
async def list_keys(
    request: Request,
    caller: Admin,
    tenant: Annotated[str | None, Query(pattern=api_keys.NAME.pattern, description="Only this tenant's keys.")] = None,
) -> JSONResponse:
    """Every key (of one tenant, with `tenant`); never a secret."""
    keys = await api_keys.list_keys_async(request.app.state.redis, settings_of(request.app), tenant)
    return JSONResponse({"keys": [view(k) for k in keys]})


@router.get("/v1/admin/keys/{key_id}", response_model=KeyView, responses={404: PROBLEM})
async def get_key(request: Request, caller: Admin, key_id: KeyId) -> Response:
    """One key, by its id."""
    key = await api_keys.get_key_async(request.app.state.redis, settings_of(request.app), key_id)
    return JSONResponse(view(key)) if key else _not_found(key_id)


@router.patch("/v1/admin/keys/{key_id}", response_model=KeyView, responses={404: PROBLEM, 422: PROBLEM})
async def update_key(request: Request, caller: Admin, key_id: KeyId, body: Annotated[KeyUpdate, Body()]) -> Response:
    """Change a key's limits. Other API processes apply them within `BLAZE_KEY_CACHE_S`."""
    settings = settings_of(request.app)
    client = request.app.state.redis
    changes = body.model_dump(exclude_unset=True)
    key = await api_keys.update_key_async(client, settings, key_id, changes)
    if key is None:
        return _not_found(key_id)
    key_cache(request.app).forget(key.id)
    target = audit.change_target(key.id, changes)
    await audit.record_async(
        client, settings, key=caller, action="key.update", target=target, tenant=key.tenant, address=_address(request)
    )
    return JSONResponse(view(key))


@router.delete("/v1/admin/keys/{key_id}", status_code=204, response_class=Response, responses={404: PROBLEM})
async def revoke_key(request: Request, caller: Admin, key_id: KeyId) -> Response:
    """Revoke a key: it ends here at once, and in every other API process within `BLAZE_KEY_CACHE_S`."""
    settings = settings_of(request.app)
    client = request.app.state.redis
    key = await api_keys.revoke_key_async(client, settings, key_id)
    if key is None:
        return _not_found(key_id)
    key_cache(request.app).forget(key.id)
    await audit.record_async(
        client, settings, key=caller, action="key.revoke", target=key.id, tenant=key.tenant, address=_address(request)
    )
    return Response(status_code=204)


@router.get("/v1/admin/audit", response_model=AuditPage)
async def read_audit(
    request: Request,
    caller: Admin,
    limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 100,
    cursor: Annotated[str | None, Query(pattern=audit.CURSOR.pattern, description="`next_cursor` of the previous page.")] = None,
) -> JSONResponse:
    """The audit trail, newest first: key creation, changes and revocation, webhook secret rotations, cancels."""
    entries, next_cursor = await audit.read_async(request.app.state.redis, settings_of(request.app), limit=limit, cursor=cursor)
    return JSONResponse({"entries": entries, "next_cursor": next_cursor})


@router.get("/v1/workers")
async def list_workers(request: Request, caller: Admin) -> JSONResponse:
    """Live workers: engine, device, breaker state and counts, loaded models, batches run,
    last heartbeat. A worker that stops beating drops out within three lease thirds."""
    settings = settings_of(request.app)
    client = request.app.state.redis
    names = [text(n) for n in await client.zrangebyscore(workers_index(settings), time.time() - settings.lease_s, "+inf")]
    states = await client.mget([Keys(settings.redis_prefix).worker(n) for n in names]) if names else []
    return JSONResponse({"workers": [json.loads(s) for s in states if s]})
