"""Artifact URLs are signed and expire with their job: whoever holds a job view (a browser, a
webhook receiver) fetches its images without a key; without a signature only a key of the
tenant that owns the job reads them, and to any other tenant they do not exist."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis

from blaze_jobs.api_keys import create_key
from blaze_jobs.artifacts import ARTIFACT_PATH, KEY_PATTERN, UrlSigner, artifact_name, url_signer
from blaze_jobs.client import BlazeClient
from blaze_jobs.settings import Settings
from tests.receiver import Receiver, path

# Generous: the first test to use the stack also waits for it to start, and an image job
# runs on a busy 2-core machine.
pytestmark = pytest.mark.timeout(300)

PROBLEM_JSON = "application/problem+json"


@dataclass(frozen=True)
class Tenants:
    """Two tenants' keys on the test stack, and the image job the first one made."""

    api_url: str
    owner_key: str
    other_key: str
    job: dict[str, Any]
    #: The job.completed webhook body the job's receiver got.
    completed: dict[str, Any]

    @property
    def url(self) -> str:
        """The job's signed image URL."""
        return str(self.job["output"]["images"][0]["url"])

    @property
    def unsigned(self) -> str:
        return self.url.split("?", 1)[0]


@pytest.fixture(scope="module")
def tenants(stack: dict[str, Any], settings: Settings, receiver: Receiver) -> Iterator[Tenants]:
    # Given two tenants, each with a key
    client = redis.Redis.from_url(settings.redis_url)
    run = uuid.uuid4().hex[:8]
    owner_key, _ = create_key(client, settings, tenant=f"acme-{run}", name="ci")
    other_key, _ = create_key(client, settings, tenant=f"globex-{run}", name="ci")
    client.close()
    # and an image job of the first, with a webhook
    hook = path()
    with BlazeClient(stack["api_url"], api_key=owner_key) as owner:
        job = owner.submit(
            "diffusion",
            {"prompt": f"a lighthouse {run}", "seed": 3, "num_inference_steps": 2},
            webhook=receiver.url(hook),
            webhook_events_filter=["completed"],
        )
        job = owner.wait(job["id"], timeout=150)
    assert job["status"] == "succeeded", job["error"]
    (request,) = receiver.wait_for(hook, 1, timeout=30)
    yield Tenants(stack["api_url"], owner_key, other_key, job, json.loads(request.body)["data"])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert not response.content.startswith(b"\x89PNG")
    return dict(response.json())


def test_a_signed_url_serves_the_image_to_anyone_until_the_job_expires(tenants: Tenants, settings: Settings) -> None:
    # When the job view's URL is fetched with no key at all
    response = httpx.get(tenants.url, timeout=30)
    # Then it is the image, cacheable by anyone as long as the signature lasts
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.content.startswith(b"\x89PNG")
    cache_control = response.headers["cache-control"]
    assert cache_control.startswith("public, max-age=")
    assert 0 < int(cache_control.rsplit("=", 1)[1]) <= settings.job_ttl_s
    # and the signature expires no later than the job's retention
    expires = int(parse_qs(urlsplit(tenants.url).query)["expires"][0])
    created = datetime.fromisoformat(tenants.job["created_at"]).timestamp()
    assert time.time() < expires <= created + settings.job_ttl_s


def test_every_view_of_the_job_signs_its_urls(tenants: Tenants) -> None:
    # When the owner reads the job again, lists its jobs and streams its events
    with BlazeClient(tenants.api_url, api_key=tenants.owner_key) as owner:
        again = owner.get(tenants.job["id"])
        (listed,) = [j for j in owner.http.get("/v1/jobs").json()["jobs"] if j["id"] == tenants.job["id"]]
        streamed = [e.data for e in owner.events(tenants.job["id"], last_event_id="0-0") if e.final][-1]
    # Then each shows the same signed URL, which needs no key
    urls = {view["output"]["images"][0]["url"] for view in (again, listed, streamed)}
    assert urls == {tenants.url}
    assert httpx.get(listed["output"]["images"][0]["url"], timeout=30).status_code == 200


def test_an_unsigned_url_needs_a_key(tenants: Tenants) -> None:
    # When the URL without its signature is fetched with no key
    response = httpx.get(tenants.unsigned, timeout=30)
    # Then it is a 401 that asks for one
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


def test_an_unsigned_url_serves_the_owners_key(tenants: Tenants) -> None:
    # When the owner's tenant fetches it unsigned, with its key
    response = httpx.get(tenants.unsigned, headers=bearer(tenants.owner_key), timeout=30)
    # Then it is the image, which only the caller's own cache may keep
    assert response.status_code == 200, response.text
    assert response.content == httpx.get(tenants.url, timeout=30).content
    assert response.headers["cache-control"].startswith("private, ")


def test_to_another_tenant_an_unsigned_artifact_does_not_exist(tenants: Tenants) -> None:
    # When another tenant fetches it unsigned, with its own key
    response = httpx.get(tenants.unsigned, headers=bearer(tenants.other_key), timeout=30)
    # Then it is the same 404 as an artifact that never was
    assert assert_problem(response, 404)["title"] == "Artifact not found"
    never = tenants.unsigned.rsplit("/", 1)[0] + "/" + "0" * 64 + ".png"
    assert httpx.get(never, headers=bearer(tenants.other_key), timeout=30).json()["title"] == "Artifact not found"


def test_a_tampered_signature_or_expiry_is_refused(tenants: Tenants) -> None:
    query = parse_qs(urlsplit(tenants.url).query)
    expires, signature = query["expires"][0], query["signature"][0]
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    for tampered in (
        f"{tenants.unsigned}?expires={expires}&signature={flipped}",  # another signature
        f"{tenants.unsigned}?expires={int(expires) + 3600}&signature={signature}",  # a later expiry
        f"{tenants.unsigned}?signature={signature}",  # no expiry
        f"{tenants.unsigned}?expires=soon&signature={signature}",  # not a time
        # another artifact's key under this signature
        f"{tenants.unsigned.rsplit('/', 1)[0]}/{'0' * 64}.png?expires={expires}&signature={signature}",
    ):
        # When it is fetched, even with the owner's key
        response = httpx.get(tampered, headers=bearer(tenants.owner_key), timeout=30)
        # Then it is a 403 that says the signature does not match, and no bytes
        assert assert_problem(response, 403)["title"] == "Invalid signature", tampered


def test_an_expired_signature_is_refused(tenants: Tenants, settings: Settings) -> None:
    # Given the image's URL signed, with the deployment's secret, to expire a minute ago
    key = tenants.unsigned.rsplit("/", 1)[1]
    client = redis.Redis.from_url(settings.redis_url)
    expired = url_signer(client, settings).signed_url(key, int(time.time()) - 60)
    client.close()
    # When it is fetched
    response = httpx.get(tenants.api_url + expired, timeout=30)
    # Then it is a 403 that says it expired
    assert assert_problem(response, 403)["title"] == "Signature expired"


def test_a_webhook_payloads_url_serves_the_image_without_a_key(tenants: Tenants) -> None:
    # Given the URL in the job.completed webhook (it names the API by BLAZE_PUBLIC_URL, which
    # the test stack leaves at its default: the path and query are what was signed)
    url = tenants.completed["output"]["images"][0]["url"]
    signed = "/v1/" + url.split("/v1/", 1)[1]
    assert "signature=" in signed
    # When a receiver fetches it, with no key
    response = httpx.get(tenants.api_url + signed, timeout=30)
    # Then it is the image
    assert response.status_code == 200, response.text
    assert response.content == httpx.get(tenants.url, timeout=30).content
    # and its signature expires when the job view's does: with the job
    assert parse_qs(urlsplit(url).query)["expires"] == parse_qs(urlsplit(tenants.url).query)["expires"]


def test_naming_another_tenants_artifact_in_a_job_reads_nothing(tenants: Tenants) -> None:
    # Given the other tenant knows the image's content address
    stolen = "/v1/artifacts/" + tenants.unsigned.rsplit("/", 1)[1]
    with BlazeClient(tenants.api_url, api_key=tenants.other_key) as other:
        # When it makes an echo job whose output would name that artifact
        job = other.wait(other.submit("echo", {"image": {"url": stolen}})["id"], timeout=60)
    # Then the job fails, as the request's fault, with no URL for anyone to sign
    assert job["status"] == "failed" and job["error"]["type"] == "request", job
    assert "did not make" in job["error"]["message"]
    assert job["output"] is None
    # and the artifact still does not exist for that tenant
    assert httpx.get(tenants.unsigned, headers=bearer(tenants.other_key), timeout=30).status_code == 404


def test_a_signature_holds_only_for_its_key_expiry_and_secret() -> None:
    # Given a URL signed for an hour
    signer, other = UrlSigner("secret", ttl_s=60), UrlSigner("another secret", ttl_s=60)
    key, expires = "a" * 64 + ".png", int(time.time()) + 3600
    signature = parse_qs(urlsplit(signer.signed_url(key, expires)).query)["signature"][0]
    # Then it holds as signed, and for nothing else
    assert signer.check(key, expires=str(expires), signature=signature) == "valid"
    assert signer.check("b" * 64 + ".png", expires=str(expires), signature=signature) == "tampered"
    assert signer.check(key, expires=str(expires + 1), signature=signature) == "tampered"
    assert other.check(key, expires=str(expires), signature=signature) == "tampered"
    assert signer.check(key, expires=None, signature=signature) == "tampered"
    # and once its hour is over it has expired
    assert signer.check(key, expires=str(expires), signature=signature, now=expires) == "expired"
    # A job's URLs expire with the job: its own expiry, else its creation and retention
    assert signer.expiry({"created_at": "1000.5", "expires_at_ms": "1030999"}) == 1030
    assert signer.expiry({"created_at": "1000.5"}) == 1060


def test_an_artifact_key_is_the_whole_name_and_nothing_after_it() -> None:
    # Given an artifact's key, and the same key with a trailing newline
    key = "a" * 64 + ".png"
    # Then the key is one, and the key with the newline (which `$` would take) is none
    assert KEY_PATTERN.fullmatch(key) and artifact_name(ARTIFACT_PATH + key) == key
    for other in (key + "\n", key + ".png", "x" + key):
        assert not KEY_PATTERN.fullmatch(other) and not KEY_PATTERN.match(other), repr(other)
        assert artifact_name(ARTIFACT_PATH + other) is None, repr(other)
