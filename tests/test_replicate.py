"""Replicate's own client, unmodified (``replicate`` 1.0.7), against the test stack: only its
base URL and key change. A prediction is a Blaze job with the same id, made by the one
create path, so the same workers run it, the same tenant owns it and the same webhooks sign it.

Every input here is unique to its test (a marker, a prompt): seeded and greedy requests are
cached, and a repeated one would be born succeeded without a worker.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import replicate
from replicate.exceptions import ModelError, ReplicateError
from replicate.prediction import Prediction
from replicate.webhook import InvalidSignatureError, Webhooks

from blaze_jobs.api_keys import create_key
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from tests.conftest import ADMIN_TOKEN, AUTH, start_api, wait_until
from tests.receiver import Receiver, path

pytestmark = pytest.mark.timeout(120)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def key(stack: dict[str, Any], settings: Settings) -> str:
    """A key of a tenant of this module's own, so its predictions are only this module's."""
    with redis.Redis.from_url(settings.redis_url) as client:
        secret, _ = create_key(client, settings, tenant=f"replicate-{uuid.uuid4().hex[:6]}", name="replicate-client")
    return secret


@pytest.fixture()
def client(stack: dict[str, Any], key: str) -> Iterator[replicate.Client]:
    """Replicate's client as a user sets it up: a key and a base URL, nothing else."""
    api = replicate.Client(api_token=key, base_url=stack["api_url"])
    api.poll_interval = 0.2  # its default is half a second: the tests wait less
    yield api
    api._client.close()


def marker() -> str:
    return uuid.uuid4().hex


def reloaded(prediction: Prediction) -> Prediction:
    prediction.reload()
    return prediction


def busy_echo(client: replicate.Client, ms: int) -> Prediction:
    """An echo prediction that holds the one echo worker (one task thread) for ``ms``, once running."""
    busy = client.models.predictions.create("blaze/echo", input={"sleep_ms": ms, "marker": marker()})
    wait_until(lambda: reloaded(busy).status == "processing", timeout=30, what="the busy prediction to start")
    return busy


def test_models_and_versions_name_the_engines_and_their_models(client: replicate.Client) -> None:
    # When the client reads the model blaze/diffusion and blaze/llm's versions
    model = client.models.get("blaze/diffusion")
    versions = client.models.get("blaze/llm").versions.list()

    # Then each model's latest version is its engine's default model, with its input schema
    assert (model.owner, model.name, model.visibility) == ("blaze", "diffusion", "public")
    assert model.latest_version is not None
    schema = model.latest_version.openapi_schema["components"]["schemas"]
    assert {"prompt", "width", "num_inference_steps"} <= set(schema["Input"]["properties"])
    assert schema["Output"]["items"]["format"] == "uri"
    # and a version is found again by its id
    llm = versions.results[0]
    assert len(llm.id) == 64 and client.models.get("blaze/llm").latest_version.id == llm.id  # type: ignore[union-attr]
    assert client.models.get("blaze/llm").versions.get(llm.id).openapi_schema == llm.openapi_schema
    # and a model that does not exist is the client's error, a 404
    with pytest.raises(ReplicateError) as missing:
        client.models.get("blaze/nothing")
    assert missing.value.status == 404 and "blaze/nothing" in (missing.value.detail or "")


def test_a_prediction_by_model_and_by_version_is_a_blaze_job_that_runs_to_its_output(
    client: replicate.Client, stack: dict[str, Any], key: str
) -> None:
    # Given the echo model's version
    version = client.models.get("blaze/echo").latest_version
    assert version is not None
    by_model_input, by_version_input = {"marker": marker()}, {"marker": marker()}

    # When one prediction is made by model (both ways the client has) and one by version
    by_model = client.predictions.create(model="blaze/echo", input=by_model_input)
    by_models = client.models.predictions.create("blaze/echo", input={"marker": marker()})
    by_version = client.predictions.create(version=version.id, input=by_version_input)

    # Then each starts as Replicate's predictions do, with every URL the client reads
    for prediction in (by_model, by_models, by_version):
        assert prediction.status in ("starting", "processing", "succeeded")
        assert prediction.model == "blaze/echo" and prediction.version == version.id
        assert prediction.urls and all(prediction.urls[name] for name in ("get", "cancel", "stream"))
    # and wait() and reload() follow them to their end, with the echo's output
    by_model.wait()
    assert (by_model.status, by_model.error) == ("succeeded", None)
    assert by_model.output == by_model.input and by_model.input == {"sleep_ms": 0, **by_model_input}
    wait_until(lambda: reloaded(by_version).status == "succeeded", timeout=30, what="the version's prediction")
    assert by_version.output == {"sleep_ms": 0, **by_version_input} and by_version.completed_at and by_version.metrics
    by_models.wait()
    assert by_models.status == "succeeded"
    # and each prediction is the Blaze job of the same id, its tenant's
    job = httpx.get(f"{stack['api_url']}/v1/jobs/{by_version.id}", headers={"Authorization": f"Bearer {key}"}).json()
    assert (job["engine"], job["status"], job["output"]) == ("echo", "succeeded", by_version.output)


def test_an_unknown_version_and_a_bad_input_are_the_clients_errors_naming_the_field(client: replicate.Client) -> None:
    # When a prediction names a version this deployment does not have
    with pytest.raises(ReplicateError) as unknown:
        client.predictions.create(version="0" * 64, input={"prompt": "x"})

    # Then the client raises its error with the problem's status and detail, naming `version`
    assert unknown.value.status == 422 and unknown.value.title == "Invalid request"
    assert (unknown.value.detail or "").startswith("version:")

    # And an input beyond the engine's schema is a 422 naming the input's field
    with pytest.raises(ReplicateError) as bad:
        client.models.predictions.create("blaze/diffusion", input={"prompt": "a", "width": 7})
    assert bad.value.status == 422 and "input.width" in (bad.value.detail or "")


def test_another_tenants_prediction_is_not_found(client: replicate.Client, stack: dict[str, Any]) -> None:
    # Given a prediction of this module's tenant
    mine = client.models.predictions.create("blaze/echo", input={"marker": marker()})

    # When a key of another tenant (the stack's admin, the default tenant's) reads, cancels or streams it
    other = replicate.Client(api_token=AUTH["Authorization"].removeprefix("Bearer "), base_url=stack["api_url"])
    for act in (lambda: other.predictions.get(mine.id), lambda: other.predictions.cancel(mine.id)):
        with pytest.raises(ReplicateError) as missing:
            act()
        # Then it is a 404, as for a prediction that does not exist
        assert missing.value.status == 404
    assert mine.urls is not None
    assert httpx.get(mine.urls["stream"], headers=AUTH, timeout=10).status_code == 404
    # and the prediction stays its own
    mine.wait()
    assert mine.status == "succeeded"


def test_a_queued_prediction_is_canceled_and_never_runs(client: replicate.Client) -> None:
    # Given the one echo worker busy and a prediction queued behind it
    busy = busy_echo(client, 2000)
    queued = client.models.predictions.create("blaze/echo", input={"marker": marker()})
    assert queued.status == "starting"

    # When the queued prediction is canceled through the client
    queued.cancel()

    # Then it is canceled at once, and once the worker is free it still never ran
    assert queued.status == "canceled" and queued.completed_at and queued.error is None
    busy.wait()
    assert busy.status == "succeeded"
    queued.reload()
    assert (queued.status, queued.started_at, queued.output) == ("canceled", None, None)
    # and canceling what has ended answers it as it is
    assert client.predictions.cancel(busy.id).status == "succeeded"


def test_a_blocking_create_that_sees_no_end_says_starting(client: replicate.Client, stack: dict[str, Any], key: str) -> None:
    # Given an echo prediction that takes three seconds
    # When it is created with `Prefer: wait=1`
    began = time.monotonic()
    prediction = client.models.predictions.create("blaze/echo", input={"sleep_ms": 3000, "marker": marker()}, wait=1)

    # Then the answer comes back within the second, having waited most of it, unfinished, as
    # `starting` (which client.run polls on; anything else it would read as the end)
    assert 0.7 <= time.monotonic() - began < 1.5
    assert prediction.status == "starting" and prediction.output is None
    # and the prediction itself keeps the job's own status beside Replicate's
    raw = httpx.get(prediction.urls["get"], headers={"Authorization": f"Bearer {key}"}).json()  # type: ignore[index]
    assert (raw["status"], raw["blaze_status"]) in {("starting", "queued"), ("processing", "running")}
    prediction.wait()
    assert prediction.status == "succeeded"


def test_a_failed_prediction_is_the_clients_model_error_and_its_streams_error(client: replicate.Client) -> None:
    # When client.run runs an echo that fails as a bad request
    with pytest.raises(ModelError) as failed:
        client.run("blaze/echo", input={"fail": "request", "marker": marker()})

    # Then the client raises its ModelError, with the prediction and the job's reason
    prediction = failed.value.prediction
    assert prediction.status == "failed" and "bad request" in (prediction.error or "")
    # and the prediction's stream raises it as the client does on an `error` event
    with pytest.raises(RuntimeError, match="bad request"):
        list(prediction.stream())


def test_predictions_list_across_pages_following_next(client: replicate.Client) -> None:
    # Given three new predictions of the tenant
    made = [client.models.predictions.create("blaze/echo", input={"marker": marker()}).id for _ in range(3)]

    # When the list is read two at a time, following each page's `next`
    page = client.predictions.list("/v1/predictions?limit=2")
    pages = [page]
    while page.next is not None and len(pages) < 50:
        page = client.predictions.list(page.next)
        pages.append(page)

    # Then every page but the last is full, `next` is an absolute URL, and the three are
    # there once each, newest first
    assert len(pages) >= 2 and all(len(p.results) == 2 for p in pages[:-1])
    assert pages[0].next and pages[0].next.startswith("http")
    listed = [p.id for each in pages for p in each.results]
    assert len(listed) == len(set(listed))
    assert [i for i in listed if i in made] == made[::-1]
    # and the client's first page, by default, holds them too
    assert set(made) <= {p.id for p in client.predictions.list().results}


def test_run_waits_for_an_image_and_returns_urls_that_fetch_pngs(client: replicate.Client) -> None:
    # When client.run makes a small image (it sends `Prefer: wait`)
    output = client.run(
        "blaze/diffusion",
        input={"prompt": f"a lighthouse {marker()}", "width": 64, "height": 64, "num_inference_steps": 2, "num_outputs": 2},
    )

    # Then it returns the images' URLs, as Replicate returns them (not an early None)
    assert isinstance(output, list) and len(output) == 2
    for url in output:
        # and each URL is signed: it fetches the PNG with no key
        answer = httpx.get(str(url), timeout=30)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert answer.content.startswith(PNG)


def test_stream_of_a_text_prediction_joins_to_its_output_and_ends_with_done(client: replicate.Client, key: str) -> None:
    # When client.stream runs a greedy text prediction
    prompt = f"Once upon a time {marker()}"
    streamed = list(client.stream("blaze/llm", input={"prompt": prompt, "max_new_tokens": 24, "temperature": 0}))

    # Then the stream is only Replicate's events, each with an id, and ends with `done`
    assert streamed and streamed[-1].event.value == "done" and streamed[-1].data == "{}"
    assert {e.event.value for e in streamed} <= {"output", "logs", "done"}
    assert all(e.id for e in streamed)
    outputs = [e.data for e in streamed if e.event.value == "output"]
    assert len(outputs) > 1, "the text came in pieces as it was made"
    # and its output events join to the prediction's final output (the newest prediction).
    # A server-sent event carries a bare CR as a line end, so the comparison reads each as one.
    final = client.predictions.list().results[0]
    assert final.input and final.input["prompt"] == prompt and final.status == "succeeded"
    assert isinstance(final.output, list)
    assert "".join(outputs) == "".join(final.output).replace("\r\n", "\n").replace("\r", "\n")
    assert final.metrics and final.metrics["output_token_count"] == 24
    # and its logs are its progress, which the client reads as such
    assert final.progress is not None and final.progress.current == final.progress.total == 24


def test_a_stream_keeps_alive_while_it_waits_and_ends_with_done_when_canceled(own_stack: Stack) -> None:
    # Given an API whose streams keep alive every 0.2 s, no worker, and a prediction that waits
    url = start_api(own_stack, BLAZE_EVENT_KEEP_ALIVE_S="0.2")
    api = replicate.Client(api_token=ADMIN_TOKEN, base_url=url)
    waiting = api.models.predictions.create("blaze/echo", input={"marker": marker()})
    assert waiting.urls is not None

    # When its stream is read for a second
    lines: list[str] = []
    with httpx.Client(headers=AUTH, timeout=10) as http, http.stream("GET", waiting.urls["stream"]) as response:
        until = time.monotonic() + 1.0
        for line in response.iter_lines():
            lines.append(line)
            if time.monotonic() > until:
                break

    # Then it is an event stream of keep-alive comments, and no event yet
    assert response.headers["content-type"].startswith("text/event-stream")
    assert sum(line.startswith(":") for line in lines) >= 3, lines
    assert not any(line.startswith(("event:", "data:")) for line in lines), lines
    # And once the prediction is canceled, its stream (read by the client) is one `done`, saying why
    api.predictions.cancel(waiting.id)
    assert [(e.event.value, json.loads(e.data)) for e in waiting.stream()] == [("done", {"reason": "canceled"})]
    api._client.close()


def test_a_webhook_delivery_is_the_prediction_and_validates_with_the_default_secret(
    client: replicate.Client, receiver: Receiver
) -> None:
    # Given the key Replicate's client reads for the tenant's webhooks
    secret = client.webhooks.default.secret()
    assert secret.key.startswith("whsec_")
    hook, input = path(), {"marker": marker()}

    # When a prediction asks for its start and its completion
    prediction = client.models.predictions.create(
        "blaze/echo", input=input, webhook=receiver.url(hook), webhook_events_filter=["start", "completed"]
    )

    # Then two deliveries come, each a prediction that replicate.webhooks.validate accepts
    deliveries = receiver.wait_for(hook, 2, timeout=30)
    bodies = []
    for delivery in deliveries:
        Webhooks.validate(headers=delivery.headers, body=delivery.body.decode(), secret=secret)
        bodies.append(json.loads(delivery.body))
    assert [(b["id"], b["status"]) for b in bodies] == [(prediction.id, "processing"), (prediction.id, "succeeded")]
    assert bodies[1]["output"]["marker"] == input["marker"]
    assert bodies[1]["urls"]["get"].endswith(f"/v1/predictions/{prediction.id}")
    # and a body changed on the way does not validate
    forged = deliveries[1].body.decode().replace("succeeded", "failed")
    with pytest.raises(InvalidSignatureError):
        Webhooks.validate(headers=deliveries[1].headers, body=forged, secret=secret)
