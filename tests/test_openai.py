"""The unmodified ``openai`` client against a real stack: models, images (URLs and base64),
chat and completions (whole and streamed), OpenAI's errors, the client's own retries making
one job, and the wait bound naming the job that goes on.

Each test writes its own prompts: greedy and seeded text jobs and seeded images are cached,
and a repeated request would be a cache hit.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis
from PIL import Image

from blaze_jobs.api_keys import create_key
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack
from tests.conftest import ADMIN_TOKEN, start_api, unique

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def tenant(stack: dict[str, Any], settings: Settings) -> Iterator[tuple[str, httpx.Client]]:
    """A key of a tenant of this test's own (its jobs are counted), and raw HTTP with it."""
    with redis.Redis.from_url(settings.redis_url) as client:
        secret, _ = create_key(client, settings, tenant=f"openai-{uuid.uuid4().hex[:6]}", name="ci")
    with httpx.Client(base_url=stack["api_url"], timeout=60, headers={"Authorization": f"Bearer {secret}"}) as http:
        yield secret, http


def jobs_of(http: httpx.Client) -> list[dict[str, Any]]:
    answer = http.get("/v1/jobs")
    assert answer.status_code == 200, answer.text
    return answer.json()["jobs"]


def test_the_models_are_the_deployments_and_an_unknown_one_or_key_is_the_clients_own_error(
    openai_api: openai.OpenAI, stack: dict[str, Any]
) -> None:
    # When the client lists the models
    models = {model.id: model for model in openai_api.models.list()}
    # Then it sees this deployment's image and text models, each with its engine
    assert models["builtin:tiny-sd"].model_extra == {"engine": "diffusion"}
    assert models["builtin:tiny-lm"].object == "model"
    assert openai_api.models.retrieve("builtin:tiny-lm").model_extra == {"engine": "llm"}
    # And an unknown model is a NotFoundError, a bad key an AuthenticationError
    with pytest.raises(openai.NotFoundError) as missing:
        openai_api.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"
    # And Replicate's models, under the same path, are still Replicate's
    replicate_model = httpx.get(f"{stack['api_url']}/v1/models/blaze/llm", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert replicate_model.status_code == 200 and "object" not in replicate_model.json()
    predictions = httpx.get(
        f"{stack['api_url']}/v1/models/blaze/llm/predictions", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert predictions.status_code == 405
    with openai.OpenAI(api_key="not-a-key", base_url=stack["api_url"] + "/v1", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError) as refused:
            stranger.models.list()
    assert refused.value.code == "invalid_api_key"


def test_images_come_as_signed_urls_and_as_base64_of_the_size_and_number_asked(openai_api: openai.OpenAI) -> None:
    # Given a prompt, two images of 64x64 a few steps each
    steps = {"num_inference_steps": 4, "seed": 7}
    # When the client asks for URLs
    by_url = openai_api.images.generate(prompt=unique("a red cube"), n=2, size="64x64", response_format="url", extra_body=steps)
    # Then each URL serves a PNG of that size, without a key
    assert by_url.data is not None and len(by_url.data) == 2
    for image in by_url.data:
        assert image.url is not None
        fetched = httpx.get(image.url, timeout=10)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
    assert by_url.size == "64x64" and by_url.output_format == "png"
    # When it asks for the bytes of three others, 64x48
    by_bytes = openai_api.images.generate(
        prompt=unique("a blue sphere"), n=3, size="64x48", response_format="b64_json", extra_body=steps
    )
    # Then they decode to three images of that size, each its own
    assert by_bytes.data is not None
    decoded = [Image.open(io.BytesIO(base64.b64decode(image.b64_json or ""))) for image in by_bytes.data]
    assert [image.size for image in decoded] == [(64, 48)] * 3
    assert len({image.tobytes() for image in decoded}) == 3


def test_a_chat_completion_answers_the_assistants_turn_with_its_usage(openai_api: openai.OpenAI) -> None:
    # When the client asks a greedy chat completion of 8 tokens
    answer = openai_api.chat.completions.create(
        model="builtin:tiny-lm",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": unique("Say hello")}],
        max_tokens=8,
        temperature=0,
    )
    # Then it is the assistant's turn, cut at the length asked, with its token counts
    assert answer.object == "chat.completion" and answer.model == "builtin:tiny-lm"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 8 and answer.usage.prompt_tokens > 0


def test_a_streamed_chat_joins_to_the_same_text_as_the_whole_answer_for_the_same_seed(openai_api: openai.OpenAI) -> None:
    # Given a seeded, sampled request
    request: dict[str, Any] = {
        "model": "builtin:tiny-lm",
        "messages": [{"role": "user", "content": unique("Tell a story")}],
        "max_tokens": 24,
        "seed": 1234,
        "temperature": 0.8,
    }
    # When the client streams it, with usage
    chunks = list(openai_api.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    # Then the chunks name the assistant, carry the text in pieces, end with a finish reason
    # and a last chunk of usage
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 1
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    # And the whole answer for the same seed is the same text
    whole = openai_api.chat.completions.create(**request)
    assert "".join(pieces) == whole.choices[0].message.content


def test_a_completion_continues_the_prompt_and_its_stream_ends_with_done(
    openai_api: openai.OpenAI, stack: dict[str, Any]
) -> None:
    # When the client asks a greedy completion
    prompt = unique("Once upon a time")
    answer = openai_api.completions.create(model="builtin:tiny-lm", prompt=prompt, max_tokens=6, temperature=0)
    # Then it is the continuation, with its usage
    assert answer.object == "text_completion" and answer.choices[0].text
    assert answer.choices[0].finish_reason == "length" and answer.usage is not None and answer.usage.completion_tokens == 6
    # When the same is streamed, read as raw server-sent events
    body = {"model": "builtin:tiny-lm", "prompt": unique("In a land far away"), "max_tokens": 6, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.stream("POST", stack["api_url"] + "/v1/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data:") :].strip() for line in response.iter_lines() if line.startswith("data:")]
    # Then it is text_completion chunks, the last with its finish reason, then [DONE]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks)


def test_an_unknown_model_and_bad_fields_are_the_clients_own_errors_naming_the_param(openai_api: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    # An unknown model is a NotFoundError
    with pytest.raises(openai.NotFoundError) as missing:
        openai_api.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    # Fields the engine cannot honour, or values out of bounds, are BadRequestErrors naming them
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (openai_api.chat.completions.create, {"model": "builtin:tiny-lm", "messages": messages, "n": 2}, "n"),
        (openai_api.chat.completions.create, {"model": "builtin:tiny-lm", "messages": messages, "tools": []}, "tools"),
        (
            openai_api.chat.completions.create,
            {"model": "builtin:tiny-lm", "messages": messages, "max_tokens": 100_000},
            "max_tokens",
        ),
        (
            openai_api.chat.completions.create,
            {"model": "builtin:tiny-lm", "messages": [{"role": "tool", "content": "x"}]},
            "messages[0].role",
        ),
        (openai_api.images.generate, {"prompt": "a cat", "size": "60x60"}, "size"),
        (openai_api.images.generate, {"prompt": "a cat", "n": 50}, "n"),
        (openai_api.completions.create, {"model": "builtin:tiny-lm", "prompt": "x", "temperature": 5}, "temperature"),
    ]
    for create, request, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            create(**request)
        assert refused.value.param == param, (request, refused.value.body)
        assert refused.value.type == "invalid_request_error"
    # And a body that is not JSON is one too
    with pytest.raises(openai.BadRequestError):
        openai_api.post(
            "/chat/completions", cast_to=object, body="not json", options={"headers": {"Content-Type": "application/json"}}
        )


def test_a_job_that_fails_is_the_clients_error_with_its_reason_and_errors_keep_openais_shape(
    openai_api: openai.OpenAI, stack: dict[str, Any]
) -> None:
    # Given a prompt within the API's bounds but beyond the model's context, which its job finds
    prompt = " ".join(uuid.uuid4().hex for _ in range(400))
    # When the client asks to continue it
    with pytest.raises(openai.BadRequestError) as failed:
        openai_api.completions.create(model="builtin:tiny-lm", prompt=prompt, max_tokens=4)
    # Then the error is the job's reason, names the job, and tells the client not to retry
    assert failed.value.code == "job_failed" and "leave no room to generate" in failed.value.message
    job_id = failed.value.message.split(" - ", 1)[1].split()[1]
    assert (
        httpx.get(f"{stack['api_url']}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["status"]
        == "failed"
    )
    assert failed.value.response.headers["x-should-retry"] == "false"
    # And an answer without a key is OpenAI's shape too, every member present
    refused = httpx.post(f"{stack['api_url']}/v1/chat/completions", json={"messages": []}, timeout=10)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}


def test_a_retried_create_answers_the_first_attempts_job_and_two_first_attempts_are_two_jobs(
    tenant: tuple[str, httpx.Client], stack: dict[str, Any]
) -> None:
    _, http = tenant
    body = {
        "model": "builtin:tiny-lm",
        "messages": [{"role": "user", "content": unique("Count")}],
        "max_tokens": 4,
        "temperature": 0,
    }
    # Given a first attempt, as the client numbers it
    first = http.post("/v1/chat/completions", json=body, headers={"x-stainless-retry-count": "0"})
    assert first.status_code == 200, first.text
    # When the client retries it
    retry = http.post("/v1/chat/completions", json=body, headers={"x-stainless-retry-count": "1"})
    # Then the retry answers the same job, and the tenant has one job
    assert retry.status_code == 200 and retry.json() == first.json()
    assert [job["id"] for job in jobs_of(http)] == [first.json()["id"]]
    # When the same request comes again as a first attempt, it is a second job
    again = http.post("/v1/chat/completions", json=body, headers={"x-stainless-retry-count": "0"})
    assert again.status_code == 200 and again.json()["id"] != first.json()["id"]
    assert len(jobs_of(http)) == 2
    # And an Idempotency-Key of the caller's own names one job across first attempts too
    keyed = {"Idempotency-Key": uuid.uuid4().hex}
    once = http.post("/v1/chat/completions", json=body, headers=keyed)
    twice = http.post("/v1/chat/completions", json=body, headers=keyed)
    assert once.status_code == twice.status_code == 200 and once.json()["id"] == twice.json()["id"]
    assert len(jobs_of(http)) == 3


@pytest.mark.parametrize("declared", [True, False], ids=["answered-before-its-timeout", "its-own-timeout"])
def test_the_clients_retries_wait_on_the_one_job_the_first_attempt_made(
    tenant: tuple[str, httpx.Client], stack: dict[str, Any], declared: bool
) -> None:
    secret, http = tenant
    # Given a client that gives up on each attempt long before the image is made, and retries:
    # told its read timeout, the API answers the 504 naming the job before it; not told, the
    # client times out (its requests' attempt numbers noted as they go out)
    attempts: list[str] = []
    answers: list[int] = []

    def note(request: Any) -> None:
        attempts.append(request.headers["x-stainless-retry-count"])

    def note_answer(response: Any) -> None:
        answers.append(response.status_code)

    noted = openai.DefaultHttpxClient(event_hooks={"request": [note], "response": [note_answer]})
    # Told 1 s, the API answers at 0.8 s: the rest carries the answer back on a busy machine.
    timeout = 1.0 if declared else 0.3
    impatient = openai.OpenAI(
        api_key=secret, base_url=stack["api_url"] + "/v1", timeout=timeout, max_retries=10, http_client=noted
    )
    headers = {} if declared else {"x-stainless-read-timeout": openai.omit}
    # When it asks for an image
    with impatient:
        slow = {"num_inference_steps": 100}
        answer = impatient.images.generate(
            prompt=unique("a slow green cone"), size="64x64", extra_body=slow, extra_headers=headers
        )
    # Then a retry got it, and the tenant has only the one job the first attempt made
    assert attempts[:2] == ["0", "1"]
    if declared:  # the attempts before the image got the 504 naming its job
        assert 504 in answers and answers[-1] == 200
    else:  # the first attempt (at least) got nothing before the client gave up
        assert len(answers) < len(attempts) and answers[-1] == 200
    assert answer.data is not None and len(answer.data) == 1
    jobs = jobs_of(http)
    assert len(jobs) == 1 and jobs[0]["status"] == "succeeded" and jobs[0]["engine"] == "diffusion"


def test_past_the_wait_bound_the_error_names_the_job_which_goes_on_and_a_full_quota_is_a_rate_limit(own_stack: Stack) -> None:
    # Given an API that waits half a second, no worker, and a key of a tenant allowed one job
    url = start_api(own_stack, BLAZE_OPENAI_WAIT_S="0.5", BLAZE_LLM_MODELS="acme/tiny-chat")
    settings = Settings(redis_url=own_stack.env["BLAZE_REDIS_URL"], redis_prefix=own_stack.env["BLAZE_REDIS_PREFIX"])
    with redis.Redis.from_url(settings.redis_url) as r:
        secret, _ = create_key(r, settings, tenant="one-job", name="ci", max_jobs=1)
    messages = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(api_key=secret, base_url=url + "/v1", max_retries=0) as client:
        # When the client asks a chat completion
        with pytest.raises(openai.InternalServerError) as late:
            client.chat.completions.create(model="builtin:tiny-lm", messages=messages, max_tokens=4)  # type: ignore[arg-type]
        # Then the error names the job and where to get it, and the job is queued still
        assert late.value.status_code == 504 and late.value.code == "job_timeout"
        body = late.value.body
        assert isinstance(body, dict)
        job_id = body["message"].split()[1]
        assert f"/v1/jobs/{job_id}" in body["message"]
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
        assert job.status_code == 200 and job.json()["status"] == "queued"
        # When the tenant, at its quota, asks another
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="builtin:tiny-lm", messages=messages, max_tokens=5)  # type: ignore[arg-type]
        # Then it is told to wait, in OpenAI's shape
        assert limited.value.code == "quota_exceeded" and limited.value.response.headers["Retry-After"]
    with openai.OpenAI(api_key=ADMIN_TOKEN, base_url=url + "/v1", max_retries=0) as client:
        # A model id with a slash (a Hugging Face id) is retrieved as any other
        assert client.models.retrieve("acme/tiny-chat").model_extra == {"engine": "llm"}
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve("acme/other")
        assert missing.value.code == "model_not_found"
        # When a stream runs past the wait bound
        stream = client.chat.completions.create(model="builtin:tiny-lm", messages=messages, max_tokens=4, stream=True)  # type: ignore[arg-type]
        with pytest.raises(openai.APIError) as cut:
            list(stream)
        # Then its last event is the error naming the job
        assert "/v1/jobs/" in cut.value.message
