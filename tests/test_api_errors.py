"""Every bad request to the real API answers a problem+json naming the fault, and creates
nothing; the OpenAPI page documents what a good request looks like."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack, free_port
from tests.conftest import AUTH

pytestmark = pytest.mark.timeout(240)

PROBLEM_JSON = "application/problem+json"
GOOD = {"prompt": "a red fox"}
A_JOB_ID = "00000000-0000-4000-8000-000000000000"
SMALL_BUDGET = 512 * 512
#: The bounds the test stack's API runs with: the defaults (its environment sets none).
BOUNDS = Settings.model_construct()


def diffusion(**input: Any) -> dict[str, Any]:
    return {"engine": "diffusion", "input": input}


# (case, JSON body, status, field named in errors)
BAD_BODIES = [
    ("missing prompt", diffusion(width=64), 422, "input.prompt"),
    ("empty prompt", diffusion(prompt=""), 422, "input.prompt"),
    ("width over the bound", diffusion(**GOOD, width=100_000), 422, "input.width"),
    ("width not a multiple of 8", diffusion(**GOOD, width=100), 422, "input.width"),
    ("height not a multiple of 8", diffusion(**GOOD, height=60), 422, "input.height"),
    ("height over the bound", diffusion(**GOOD, height=BOUNDS.max_height + 8), 422, "input.height"),
    ("steps over the bound", diffusion(**GOOD, num_inference_steps=BOUNDS.max_steps + 1), 422, "input.num_inference_steps"),
    ("zero steps", diffusion(**GOOD, num_inference_steps=0), 422, "input.num_inference_steps"),
    ("outputs over the bound", diffusion(**GOOD, num_outputs=BOUNDS.max_outputs + 1), 422, "input.num_outputs"),
    ("prompt longer than max_prompt_chars", diffusion(prompt="x" * (BOUNDS.max_prompt_chars + 1)), 422, "input.prompt"),
    (
        "negative prompt too long",
        diffusion(**GOOD, negative_prompt="x" * (BOUNDS.max_prompt_chars + 1)),
        422,
        "input.negative_prompt",
    ),
    ("unknown engine", {"engine": "sora", "input": GOOD}, 422, "engine"),
    ("unknown model", {**diffusion(**GOOD), "model": "someone/else"}, 422, "model"),
    ("echo with a foreign model", {"engine": "echo", "model": "builtin:tiny-sd", "input": {}}, 422, "model"),
    ("width as text", diffusion(**GOOD, width="wide"), 422, "input.width"),
    ("width as a numeric string", diffusion(**GOOD, width="64"), 422, "input.width"),
    ("prompt as a number", diffusion(prompt=7), 422, "input.prompt"),
    ("negative seed", diffusion(**GOOD, seed=-1), 422, "input.seed"),
    ("seed beyond 32 bits", diffusion(**GOOD, seed=2**32), 422, "input.seed"),
    ("guidance scale as text", diffusion(**GOOD, guidance_scale="x"), 422, "input.guidance_scale"),
    ("gif output", diffusion(**GOOD, output_format="gif"), 422, "input.output_format"),
    ("unknown field in diffusion input", diffusion(**GOOD, strength=0.5), 422, "input.strength"),
    ("unknown top-level field", {**diffusion(**GOOD), "priority": 1}, 422, "priority"),
    ("input not an object", {"engine": "diffusion", "input": "a red fox"}, 422, "input"),
    ("echo sleeping too long", {"engine": "echo", "input": {"sleep_ms": BOUNDS.max_sleep_ms + 1}}, 422, "input.sleep_ms"),
    ("body a JSON list", [diffusion(**GOOD)], 422, "body"),
]


@pytest.fixture()
def jobs_in_redis(settings: Settings) -> Iterator[Callable[[], int]]:
    """How many jobs this run's deployment has stored for the tests' tenant (the admin
    token's: the default tenant), by that tenant's all-jobs index."""
    client = redis.Redis.from_url(settings.redis_url)
    index = Keys(settings.redis_prefix).tenant_all(settings.default_tenant)
    yield lambda: client.zcard(index)
    client.close()


def assert_problem(response: httpx.Response, status: int, *, field: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with ``status`` and an id (which the API's log
    carries), naming ``field`` when given."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    problem = response.json()
    assert {"type", "title", "status", "detail", "id"} <= problem.keys(), problem
    assert problem["status"] == status
    assert problem["title"] and problem["detail"]
    if field is not None:
        fields = [error["field"] for error in problem.get("errors", [])]
        assert field in fields, f"expected {field!r} among {fields}: {problem['detail']}"
        assert all(error.get("message") for error in problem["errors"])
    return problem


@pytest.mark.parametrize(("body", "status", "field"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_a_bad_job_is_refused_naming_the_field(
    http: httpx.Client, jobs_in_redis: Any, body: Any, status: int, field: str
) -> None:
    # Given the number of jobs stored so far
    before = jobs_in_redis()

    # When a client posts a bad job
    response = http.post("/v1/jobs", json=body)

    # Then it is refused as a problem naming the field, and no job is created
    assert_problem(response, status, field=field)
    assert jobs_in_redis() == before


@pytest.fixture(scope="module")
def small_api(test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second ``blaze api`` whose pixel budget is smaller than its largest width times
    its largest height, so the pixel bound can be broken alone (with the defaults,
    1024 x 1024 is both the largest size and exactly the budget)."""
    with Stack(env=test_env, log_dir=tmp_path_factory.mktemp("small-api-logs")) as stack:
        port = free_port()
        api = stack.blaze("api", "api", "--port", str(port), BLAZE_MAX_PIXELS=str(SMALL_BUDGET))
        url = f"http://127.0.0.1:{port}"
        stack.wait_http("the small API", api, f"{url}/readyz", timeout=30)
        yield url


def test_an_image_over_max_pixels_is_refused_though_each_side_fits(small_api: str, jobs_in_redis: Any) -> None:
    # Given a deployment with a pixel budget of 512 x 512, and a 1024 x 512 image: each
    # side within its own bound, the two together over budget
    before = jobs_in_redis()

    # When a client asks for that image
    with httpx.Client(base_url=small_api, timeout=10, headers=AUTH) as http:
        response = http.post("/v1/jobs", json=diffusion(**GOOD, width=1024, height=512))

    # Then the size is refused, naming the width and the budget, and nothing is stored
    problem = assert_problem(response, 422, field="input.width")
    assert str(SMALL_BUDGET) in problem["detail"]
    assert jobs_in_redis() == before


def test_a_job_without_an_engine_names_the_engine_field(http: httpx.Client) -> None:
    # When a client leaves the engine out, Then the problem names `engine`
    assert_problem(http.post("/v1/jobs", json={"input": GOOD}), 422, field="engine")


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b'{"engine": "diffusion", "input": {"prompt": "a fox"',
        b"\xff\xfe",
        b'{"engine": "diffusion", "input": {"prompt": "a \xff fox"}}',
        b'{"engine": "echo", "input": {"deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
    ],
    ids=["garbage", "empty", "truncated", "not utf-8", "not utf-8 inside a string", "too deep to parse"],
)
def test_a_body_that_is_not_json_is_refused(http: httpx.Client, jobs_in_redis: Any, content: bytes) -> None:
    # Given a body that claims to be JSON but is not
    before = jobs_in_redis()

    # When it is posted, Then the problem names the body and nothing is stored
    response = http.post("/v1/jobs", content=content, headers={"content-type": "application/json"})
    assert_problem(response, 422, field="body")
    assert jobs_in_redis() == before


@pytest.mark.parametrize(
    ("method", "path", "status", "field"),
    [
        ("GET", f"/v1/jobs/{A_JOB_ID}", 404, None),
        ("POST", f"/v1/jobs/{A_JOB_ID}/cancel", 404, None),
        ("GET", "/v1/jobs/not-even-a-uuid", 404, None),
        ("GET", f"/v1/jobs?limit={BOUNDS.list_limit_max + 1}", 422, "limit"),
        ("GET", "/v1/jobs?limit=0", 422, "limit"),
        ("GET", "/v1/jobs?limit=many", 422, "limit"),
        ("GET", "/v1/jobs?status=done", 422, "status"),
        ("GET", "/v1/jobs?engine=sora", 422, "engine"),
        ("GET", "/v1/jobs?cursor=not-a-cursor", 422, "cursor"),
        ("GET", "/v1/jobs?cursor=-1", 422, "cursor"),
        ("GET", "/v1/artifacts/" + "0" * 64 + ".png", 404, None),
        ("GET", "/v1/artifacts/not-a-key", 404, None),
        ("GET", "/v1/artifacts/..%2F..%2Fetc%2Fpasswd", 404, None),
        ("GET", "/v1/nowhere", 404, None),
        ("DELETE", "/v1/jobs", 405, None),
    ],
)
def test_a_bad_read_or_cancel_is_a_problem(
    http: httpx.Client, jobs_in_redis: Any, method: str, path: str, status: int, field: str | None
) -> None:
    # Given the jobs stored so far
    before = jobs_in_redis()

    # When a client asks for something that is not there, or asks badly
    response = http.request(method, path)

    # Then the answer is a problem (naming the query parameter when one is at fault)
    assert_problem(response, status, field=field)
    assert jobs_in_redis() == before


def test_a_wrong_method_names_every_method_the_path_takes(http: httpx.Client) -> None:
    # When a client uses a method no route at `/v1/jobs` takes
    response = http.delete("/v1/jobs")

    # Then the 405 problem says which methods the path does take: listing and creating
    assert_problem(response, 405)
    assert sorted(m.strip() for m in response.headers["allow"].split(",")) == ["GET", "POST"]


def test_a_bad_request_changes_no_listing(http: httpx.Client) -> None:
    # Given the job list as it stands
    listed = http.get("/v1/jobs", params={"limit": 200}).json()

    # When a client sends a burst of bad jobs
    for _, body, _, _ in BAD_BODIES:
        assert http.post("/v1/jobs", json=body).status_code >= 400

    # Then the job list is unchanged
    assert [job["id"] for job in http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]] == [
        job["id"] for job in listed["jobs"]
    ]


def test_the_openapi_page_documents_the_image_input(http: httpx.Client) -> None:
    # When a client reads the OpenAPI document
    response = http.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()

    # Then creating a job is documented, with the image input's fields described
    assert "/v1/jobs" in spec["paths"] and "post" in spec["paths"]["/v1/jobs"]
    fields = spec["components"]["schemas"]["DiffusionInput"]["properties"]
    for name in (
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "num_outputs",
        "output_format",
    ):
        assert fields[name].get("description"), f"DiffusionInput.{name} has no description"
    assert "prompt" in spec["components"]["schemas"]["DiffusionInput"]["required"]
    assert set(fields["output_format"]["enum"]) == {"png", "jpeg", "webp"}
    # And its problem answers are declared
    assert PROBLEM_JSON in spec["paths"]["/v1/jobs"]["post"]["responses"]["422"]["content"]
    assert PROBLEM_JSON in spec["paths"]["/v1/jobs"]["post"]["responses"]["413"]["content"]
    assert "400" not in spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert "404" in spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]

    # And the interactive docs answer
    docs = http.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
