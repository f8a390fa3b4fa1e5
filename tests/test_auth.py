"""Who may call the API: every ``/v1`` route asks for a Bearer key, answering 401 (with
``WWW-Authenticate: Bearer``) for a missing, malformed, unknown or revoked one; admin routes
answer 403 to other keys; revocation reaches an API process within ``BLAZE_KEY_CACHE_S``;
the admin routes make, change and revoke keys and leave an audit trail. Real Redis, a real
``blaze api`` process, real HTTP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from blaze_jobs import api_keys
from blaze_jobs.api.auth import CACHE_MAX_KEYS, CACHE_MAX_UNKNOWN, KeyCache
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack, StackError, free_port
from tests.conftest import AUTH, REDIS_URL, delete_keys, start_api, wait_until

#: The API's key cache here: the deployment's default, so the measured bound is the real one.
KEY_CACHE_S = 2.0
#: What a busy two-core machine may add to the cache's bound before a revoked key fails.
REVOCATION_MARGIN_S = 3.0


@pytest.fixture(scope="module")
def api(test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One ``blaze api`` under a prefix of this module's own, and a Redis client to make keys with."""
    prefix = f"blaze-test-auth-{uuid.uuid4().hex[:8]}:"
    env = {**test_env, "BLAZE_REDIS_PREFIX": prefix, "BLAZE_KEY_CACHE_S": str(KEY_CACHE_S)}
    with Stack(env=env, log_dir=tmp_path_factory.mktemp("auth-logs")) as stack:
        port = free_port()
        child = stack.blaze("api", "api", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        try:
            stack.wait_http("the API", child, f"{url}/readyz", timeout=60)
        except StackError as error:
            pytest.fail(str(error))
        with redis.Redis.from_url(REDIS_URL) as client:
            yield {"url": url, "settings": Settings(redis_url=REDIS_URL, redis_prefix=prefix), "redis": client}
    delete_keys(prefix)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_unauthorized(answer: httpx.Response) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert answer.json()["status"] == 401


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Token bz_live_x"},
        {"Authorization": "bz_live_no-scheme"},
        {"Authorization": "Bearer bz_live_" + "x" * 32},
    ],
    ids=["missing", "basic", "bearer-alone", "other-scheme", "no-scheme", "unknown"],
)
def test_a_request_without_a_usable_key_is_401(api: dict[str, Any], headers: dict[str, str]) -> None:
    # Given the API, and a request whose Authorization header is missing, malformed or unknown
    with httpx.Client(base_url=api["url"], timeout=10) as http:
        # When it asks for any /v1 route
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/workers"), ("GET", "/v1/admin/keys")):
            # Then it is a 401 problem that says how to authenticate
            assert_unauthorized(http.request(method, path, headers=headers, json={"engine": "echo", "input": {}}))


def test_health_and_docs_stay_open(api: dict[str, Any]) -> None:
    # Given no key at all
    with httpx.Client(base_url=api["url"], timeout=10) as http:
        # Then health, readiness and the docs answer
        for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
            assert http.get(path).status_code == 200, path


def test_a_key_of_a_tenant_works_and_admin_routes_refuse_it(api: dict[str, Any]) -> None:
    # Given a key of tenant acme, not an admin
    secret, key = api_keys.create_key(api["redis"], api["settings"], tenant="acme", name="ci")
    with httpx.Client(base_url=api["url"], timeout=10, headers=bearer(secret)) as http:
        # When it lists jobs, it may
        assert http.get("/v1/jobs").status_code == 200

        # But every admin route answers 403, a problem
        for method, path in (
            ("GET", "/v1/workers"),
            ("GET", "/v1/admin/keys"),
            ("POST", "/v1/admin/keys"),
            ("GET", f"/v1/admin/keys/{key.id}"),
            ("PATCH", f"/v1/admin/keys/{key.id}"),
            ("DELETE", f"/v1/admin/keys/{key.id}"),
            ("GET", "/v1/admin/audit"),
        ):
            answer = http.request(method, path, json={"tenant": "acme", "name": "mine", "admin": True})
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.headers["Content-Type"] == "application/problem+json"

    # And the key made nothing
    assert [k.name for k in api_keys.list_keys(api["redis"], api["settings"], "acme")] == ["ci"]


def test_a_revoked_key_fails_within_the_key_cache_bound(api: dict[str, Any]) -> None:
    # Given a key the API has just taken (so its process has it cached)
    secret, key = api_keys.create_key(api["redis"], api["settings"], tenant="revoking", name="soon-gone")
    with httpx.Client(base_url=api["url"], timeout=10, headers=bearer(secret)) as http:
        assert http.get("/v1/jobs").status_code == 200

        # When an operator revokes it in Redis (as `blaze keys revoke` does), not through this API
        assert api_keys.revoke_key(api["redis"], api["settings"], key.id) == key
        revoked = time.monotonic()

        # Then the API refuses it within the cache's bound
        wait_until(lambda: http.get("/v1/jobs").status_code == 401, timeout=KEY_CACHE_S + 30, what="a 401", interval=0.02)
        took = time.monotonic() - revoked
        print(f"revocation took effect after {took:.3f} s (BLAZE_KEY_CACHE_S={KEY_CACHE_S})")
        assert took < KEY_CACHE_S + REVOCATION_MARGIN_S
        assert_unauthorized(http.get("/v1/jobs"))


def test_an_admin_makes_changes_and_revokes_keys_over_http(api: dict[str, Any]) -> None:
    with httpx.Client(base_url=api["url"], timeout=10, headers=AUTH) as admin:
        # Given an admin (the deployment's admin token) making a key for tenant globex
        made = admin.post("/v1/admin/keys", json={"tenant": "globex", "name": "batch", "rate": "600/minute", "max_jobs": 50})
        assert made.status_code == 201, made.text
        created = made.json()
        secret, key_id = created["secret"], created["id"]
        assert secret.startswith("bz_live_") and len(secret) >= len("bz_live_") + 22  # at least 128 bits
        assert created["tenant"] == "globex" and created["rate"] == "600/minute" and created["max_jobs"] == 50

        # Then the key works, at once
        assert httpx.get(f"{api['url']}/v1/jobs", headers=bearer(secret)).status_code == 200

        # And listing and reading it show it without its secret
        listed = admin.get("/v1/admin/keys", params={"tenant": "globex"}).json()["keys"]
        assert [k["id"] for k in listed] == [key_id]
        assert "secret" not in listed[0] and secret not in admin.get("/v1/admin/keys").text
        assert admin.get(f"/v1/admin/keys/{key_id}").json()["name"] == "batch"

        # When the admin changes its limits, and sets its rate back to the deployment's default
        changed = admin.patch(f"/v1/admin/keys/{key_id}", json={"max_jobs": 7, "max_priority": 3, "rate": None})
        assert changed.status_code == 200, changed.text
        assert changed.json() | {"created_at": 0} == {
            "id": key_id,
            "tenant": "globex",
            "name": "batch",
            "admin": False,
            "rate": Settings().default_rate,
            "max_jobs": 7,
            "max_priority": 3,
            "created_at": 0,
        }

        # And revokes it
        assert admin.delete(f"/v1/admin/keys/{key_id}").status_code == 204

        # Then the key answers 401 from this process at once, and is gone from the list
        assert_unauthorized(httpx.get(f"{api['url']}/v1/jobs", headers=bearer(secret)))
        assert admin.get("/v1/admin/keys", params={"tenant": "globex"}).json()["keys"] == []
        for method in ("GET", "PATCH", "DELETE"):
            assert admin.request(method, f"/v1/admin/keys/{key_id}", json={}).status_code == 404

        # And the audit trail shows, newest first, who did what to which key, and from where
        entries = admin.get("/v1/admin/audit").json()["entries"]
        mine = [e for e in entries if e["target"].startswith(key_id)]
        assert [e["action"] for e in mine] == ["key.revoke", "key.update", "key.create"]
        for entry in mine:
            assert entry["who"] == {"key_id": "admin-token", "name": "admin-token", "tenant": "default"}
            assert entry["tenant"] == "globex"
            assert entry["address"] == "127.0.0.1"


def test_the_audit_trail_pages_newest_first(api: dict[str, Any]) -> None:
    with httpx.Client(base_url=api["url"], timeout=10, headers=AUTH) as admin:
        # Given three keys made one after another
        ids = [admin.post("/v1/admin/keys", json={"tenant": "paging", "name": f"k{i}"}).json()["id"] for i in range(3)]

        # When the admin reads the trail two entries at a time
        first = admin.get("/v1/admin/audit", params={"limit": 2}).json()
        second = admin.get("/v1/admin/audit", params={"limit": 2, "cursor": first["next_cursor"]}).json()

        # Then the pages follow each other, newest first
        assert [e["target"] for e in first["entries"]] == [ids[2], ids[1]]
        assert second["entries"][0]["target"] == ids[0]
        assert admin.get("/v1/admin/audit", params={"cursor": "not-a-cursor"}).status_code == 422


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tenant": "a b", "name": "ci"}, "tenant"),
        ({"tenant": "acme", "name": ""}, "name"),
        ({"tenant": "acme", "name": "x" * 65}, "name"),
        ({"name": "ci"}, "tenant"),
        ({"tenant": "acme", "name": "ci", "rate": "lots"}, "rate"),
        ({"tenant": "acme", "name": "ci", "max_jobs": 0}, "max_jobs"),
        ({"tenant": "acme", "name": "ci", "max_priority": -1}, "max_priority"),
        ({"tenant": "acme", "name": "ci", "owner": "me"}, "owner"),
    ],
)
def test_a_bad_key_field_is_a_422_naming_it(api: dict[str, Any], body: dict[str, Any], field: str) -> None:
    # Given an admin sending a key with one bad field
    answer = httpx.post(f"{api['url']}/v1/admin/keys", json=body, headers=AUTH, timeout=10)

    # Then it is a 422 problem naming that field, and no key was made
    assert answer.status_code == 422, answer.text
    assert [e["field"] for e in answer.json()["errors"]] == [field]
    assert all(k.tenant != "acme" or k.name == "ci" for k in api_keys.list_keys(api["redis"], api["settings"]))


def test_with_auth_off_no_key_is_asked_for(own_stack: Stack, tmp_path: Path) -> None:
    # Given an API started with BLAZE_AUTH=off
    url = start_api(own_stack, BLAZE_AUTH="off")

    # When a request comes with no key at all
    answer = httpx.get(f"{url}/v1/jobs", timeout=10)

    # Then it is served, as the admin of the default tenant, and the API said so loudly at start
    assert answer.status_code == 200, answer.text
    assert httpx.get(f"{url}/v1/admin/keys", timeout=10).status_code == 200
    log = own_stack.child("api").log_path.read_text()
    assert "BLAZE_AUTH=off" in log and "Every caller" in log and "WARNING" in log.upper()


def test_the_key_cache_is_bounded_and_unknown_keys_cannot_push_known_ones_out() -> None:
    # Given a process's key cache holding one real key
    cache = KeyCache(ttl_s=KEY_CACHE_S)
    key = api_keys.ApiKey(id="key_0123456789ab", tenant="acme", name="ci")
    cache.put("real", key, now=0.0)

    # When a client sends many more unknown secrets than the cache holds
    for n in range(CACHE_MAX_UNKNOWN * 3):
        cache.put(f"guess-{n}", None, now=0.5)

    # Then the unknown ones stay within their bound, and the real key is still served from memory
    assert len(cache.unknown) <= CACHE_MAX_UNKNOWN
    assert cache.get("real", now=1.0) == (True, key)
    assert cache.get(f"guess-{CACHE_MAX_UNKNOWN * 3 - 1}", now=1.0) == (True, None)

    # And an entry is trusted only for the cache's bound
    assert cache.get("real", now=KEY_CACHE_S + 0.01) == (False, None)

    # And known keys stay within theirs too
    for n in range(CACHE_MAX_KEYS + 10):
        cache.put(f"key-{n}", key, now=0.0)
    assert len(cache.known) <= CACHE_MAX_KEYS

    # And forgetting a key (its limits changed, or it was revoked, here) drops every entry of it
    cache.forget(key.id)
    assert cache.known == {}
