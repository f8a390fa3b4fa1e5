"""A hostile or careless request costs one refusal, never the deployment: input no reader
could read back is refused before it is stored, bodies and inputs are bounded, a record
stored before these bounds existed still reads, every error is a problem with an id the log
carries, and forwarded headers are believed only from configured proxies."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from blaze_jobs.jobs import new_record
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings
from blaze_jobs.stack import Stack, free_port
from blaze_jobs.store import JobStore
from tests.conftest import AUTH, own_prefix, start_api, wait_until
from tests.test_api_errors import assert_problem

pytestmark = pytest.mark.timeout(180)

BOUNDS = Settings.model_construct()
#: Deeper than orjson writes (255), as the worker's 500-deep RecursionError was.
DEEP = 500


@dataclass
class API:
    url: str
    settings: Settings
    stack: Stack

    @property
    def log(self) -> Path:
        """The API process's log (``start_api`` names it ``api``)."""
        return self.stack.log_dir / "api.log"

    def stored(self) -> int:
        """How many jobs this API's deployment has stored for the tests' tenant (the admin
        token's: the default tenant), by that tenant's all-jobs index."""
        with redis.Redis.from_url(self.settings.redis_url) as client:
            return client.zcard(Keys(self.settings.redis_prefix).tenant_all(self.settings.default_tenant))


@pytest.fixture(scope="module")
def api(test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[API]:
    """``blaze api`` alone, under a key prefix of its own: nothing here needs a worker."""
    with (
        own_prefix("hostile") as prefix,
        Stack(env={**test_env, "BLAZE_REDIS_PREFIX": prefix}, log_dir=tmp_path_factory.mktemp("hostile")) as stack,
    ):
        url = start_api(stack)
        yield API(url, Settings(redis_url=test_env["BLAZE_REDIS_URL"], redis_prefix=prefix), stack)


@pytest.fixture()
def http(api: API) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as session:
        yield session


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def echo(**input: Any) -> dict[str, Any]:
    return {"engine": "echo", "input": input}


# (case, raw JSON body, field named). Raw text: NaN and lone surrogates are what a client's
# JSON library may write, and what Python's own reader accepts.
UNREADABLE = [
    ("lone surrogate in a value", b'{"engine":"echo","input":{"text":"a\\ud800b"}}', "input.text"),
    ("lone low surrogate in a list", b'{"engine":"echo","input":{"texts":["ok","\\udc00"]}}', "input.texts.1"),
    ("lone surrogate in a key", b'{"engine":"echo","input":{"a\\ud800":1}}', "input"),
    ("lone surrogate in a prompt", b'{"engine":"diffusion","input":{"prompt":"a fox \\ud83d"}}', "input.prompt"),
    ("NaN", b'{"engine":"echo","input":{"x":NaN}}', "input.x"),
    ("Infinity deep inside", b'{"engine":"echo","input":{"a":{"b":[1,Infinity]}}}', "input.a.b.1"),
    ("-Infinity", b'{"engine":"echo","input":{"x":-Infinity}}', "input.x"),
    (
        "NaN as a guidance scale",
        b'{"engine":"diffusion","input":{"prompt":"a fox","guidance_scale":NaN}}',
        "input.guidance_scale",
    ),
]


@pytest.mark.parametrize(("body", "field"), [c[1:] for c in UNREADABLE], ids=[c[0] for c in UNREADABLE])
def test_input_that_no_reader_could_read_back_is_refused_before_it_is_stored(
    api: API, http: httpx.Client, body: bytes, field: str
) -> None:
    # Given the jobs stored so far
    before = api.stored()

    # When a client posts input JSON cannot carry (NaN) or UTF-8 cannot encode (a lone surrogate)
    response = http.post("/v1/jobs", content=body, headers={"content-type": "application/json"})

    # Then it is refused naming the field, nothing is stored, and the list still reads
    assert_problem(response, 422, field=field)
    assert api.stored() == before
    assert http.get("/v1/jobs").status_code == 200


@pytest.mark.parametrize("depth", [BOUNDS.max_input_depth, DEEP, 100_000], ids=["one over the bound", "500 deep", "100,000 deep"])
def test_input_nested_deeper_than_the_bound_is_refused(api: API, http: httpx.Client, depth: int) -> None:
    # Given the jobs stored so far, and an echo input one level over the bound or far deeper
    # (100,000 deep is too deep for Python's JSON reader itself)
    before = api.stored()
    body = f'{{"engine":"echo","input":{{"d":{"[" * depth}1{"]" * depth}}}}}'

    # When it is posted
    response = http.post("/v1/jobs", content=body, headers={"content-type": "application/json"})

    # Then it is refused as bad input, not run by a worker to a RecursionError
    assert_problem(response, 422, field="input.d" + ".0" * (BOUNDS.max_input_depth - 1) if depth < 10_000 else "body")
    assert api.stored() == before


def test_input_at_the_depth_bound_is_accepted(http: httpx.Client) -> None:
    # When an input reaches the depth bound exactly (the input object is its first level)
    response = http.post("/v1/jobs", json=echo(d=nested(BOUNDS.max_input_depth - 1)))

    # Then it is accepted and reads back unchanged
    assert response.status_code == 202, response.text
    assert http.get(response.headers["location"]).json()["input"]["d"] == nested(BOUNDS.max_input_depth - 1)


def test_an_input_larger_than_the_bound_is_refused(api: API, http: httpx.Client) -> None:
    # Given an echo input over BLAZE_MAX_INPUT_BYTES in a body within BLAZE_MAX_BODY_BYTES
    before = api.stored()
    text = "x" * (BOUNDS.max_input_bytes + 1)
    assert len(text) < BOUNDS.max_body_bytes

    # When it is posted, Then it is refused naming the input and its bound, and not stored
    problem = assert_problem(http.post("/v1/jobs", json=echo(text=text)), 422, field="input")
    assert str(BOUNDS.max_input_bytes) in problem["detail"]
    assert api.stored() == before


def test_a_body_over_the_bound_is_refused_by_its_length(api: API, http: httpx.Client) -> None:
    # Given a 10 MB body (it cost about 60 MB of Redis when accepted)
    before = api.stored()
    body = {"engine": "echo", "input": {"text": "x" * 10_000_000}}

    # When it is posted, Then it is a 413 problem naming the bound, and nothing is stored
    problem = assert_problem(http.post("/v1/jobs", json=body), 413)
    assert str(BOUNDS.max_body_bytes) in problem["detail"]
    assert api.stored() == before


def test_a_body_over_the_bound_is_refused_while_it_is_read(api: API) -> None:
    # Given a body sent in chunks, with no Content-Length to trust, longer than the bound
    before = api.stored()

    def chunks() -> Iterator[bytes]:
        yield b'{"engine":"echo","input":{"text":"'
        for _ in range(3 * BOUNDS.max_body_bytes // 65_536):
            yield b"x" * 65_536
        yield b'"}}'

    # When it is posted
    with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as http:
        response = http.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers

        # Then it is a 413 problem, nothing is stored, and the API answers the next request
        assert_problem(response, 413)
        assert api.stored() == before
        assert http.get("/healthz").status_code == 200


def test_a_body_that_is_not_utf8_inside_a_string_is_bad_json(api: API, http: httpx.Client) -> None:
    # Given a body whose only fault is a byte that is not UTF-8 inside a string (it was a 400
    # the schema did not document)
    before = api.stored()

    # When it is posted, Then it is a 422 naming the body
    response = http.post(
        "/v1/jobs", content=b'{"engine":"echo","input":{"s":"\xff"}}', headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, field="body")
    assert api.stored() == before


# --- records stored before the bounds existed ------------------------------------------------

OLD_INPUTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "a lone surrogate": ({"text": "a\ud800b"}, {"text": "a\ufffdb"}),
    "NaN and Infinity": ({"x": math.nan, "y": [math.inf, -math.inf, 1.5]}, {"x": None, "y": [None, None, 1.5]}),
    "nesting deeper than 255": ({"d": nested(300)}, {"d": nested(300)}),
    "an integer beyond 64 bits": ({"n": 2**70}, {"n": 2**70}),
}


def store_old_records(api: API) -> dict[str, str]:
    """Jobs as the API stored them before it bounded input (such records exist in Redis for
    their whole retention), each holding something JSON or UTF-8 cannot carry; by case."""
    ids = {}
    with redis.Redis.from_url(api.settings.redis_url) as client:
        store = JobStore(client, api.settings)
        for case, (stored, _) in OLD_INPUTS.items():
            ids[case] = str(uuid.uuid4())
            store.create(
                new_record(
                    job_id=ids[case], tenant="default", engine="echo", model="builtin:echo", input=stored, created_at=time.time()
                )
            )
    return ids


def test_a_record_stored_before_the_bounds_existed_still_reads(api: API, http: httpx.Client) -> None:
    # Given jobs stored before the bounds, holding what JSON cannot carry
    ids = store_old_records(api)

    # When a client reads each job, and the page that lists them all
    page = http.get("/v1/jobs", params={"limit": len(OLD_INPUTS)})

    # Then every read answers, with the value JSON can carry in place of what it cannot
    assert page.status_code == 200, page.text
    listed = {job["id"]: job["input"] for job in page.json()["jobs"]}
    for case, (_, readable) in OLD_INPUTS.items():
        response = http.get(f"/v1/jobs/{ids[case]}")
        assert response.status_code == 200, (case, response.text)
        assert response.json()["input"] == listed[ids[case]] == readable, case


def test_a_record_stored_before_the_bounds_existed_still_streams(api: API, http: httpx.Client) -> None:
    # Given jobs stored before the bounds, holding what JSON cannot carry
    ids = store_old_records(api)

    for case, (_, readable) in OLD_INPUTS.items():
        # When a client opens each job's event stream (the jobs stay queued: no worker here)
        with http.stream("GET", f"/v1/jobs/{ids[case]}/events") as response:
            assert response.status_code == 200, case
            data = next(line for line in response.iter_lines() if line.startswith("data: "))

        # Then its first event is the job, as strict JSON, with what JSON can carry in place
        # of what it cannot
        # (orjson reads strictly: NaN, Infinity and lone surrogates are errors to it)
        assert orjson.loads(data.removeprefix("data: "))["input"] == readable, case


# --- errors -----------------------------------------------------------------------------------


def test_an_unexpected_error_is_a_problem_whose_id_the_log_carries(api: API, http: httpx.Client) -> None:
    # Given a job hash the API never wrote (a foreign tool's, or a corrupt one): no fields a
    # job has but its status
    job_id = str(uuid.uuid4())
    with redis.Redis.from_url(api.settings.redis_url) as client:
        client.hset(api.settings.key("job", job_id), mapping={"status": "queued"})
        client.expire(api.settings.key("job", job_id), 600)

    # When a client reads it
    response = http.get(f"/v1/jobs/{job_id}")

    # Then the answer is a 500 problem with an id, and the API's log has that id with the cause
    problem = assert_problem(response, 500)
    assert problem["id"] in problem["detail"]
    log = api.log
    wait_until(lambda: problem["id"] in log.read_text(), timeout=10, what="the problem id in the API's log")
    assert "KeyError" in log.read_text().split(problem["id"], 1)[1]

    # And the same connection serves the next request
    assert http.get("/healthz").status_code == 200


def test_a_refusal_has_an_id_the_log_carries(api: API, http: httpx.Client) -> None:
    # When a client's request is refused
    problem = assert_problem(http.post("/v1/jobs", json=echo(sleep_ms=-1)), 422, field="input.sleep_ms")

    # Then the log says why under the answer's id
    log = api.log
    wait_until(lambda: problem["id"] in log.read_text(), timeout=10, what="the problem id in the API's log")


# --- forwarded headers ------------------------------------------------------------------------

FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}


def test_forwarded_headers_from_an_unconfigured_proxy_are_ignored(http: httpx.Client, api: API) -> None:
    # Given an API with no trusted proxies (the default), and a local process that claims to
    # be a proxy forwarding an https request from elsewhere
    # When it creates a job
    response = http.post("/v1/jobs", json=echo(), headers=FORWARDED)

    # Then the job's URLs are the address the request really came in on
    assert response.status_code == 202, response.text
    assert response.json()["urls"]["get"].startswith(f"{api.url}/v1/jobs/")


def test_forwarded_headers_from_a_configured_proxy_are_believed(api: API) -> None:
    # Given an API that trusts a proxy on 127.0.0.1
    port = free_port()
    child = api.stack.blaze("api-behind-a-proxy", "api", "--port", str(port), BLAZE_TRUSTED_PROXIES="127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    api.stack.wait_http("the API behind a proxy", child, f"{url}/readyz", timeout=60)

    # When that proxy forwards an https request
    response = httpx.post(f"{url}/v1/jobs", json=echo(), headers={**AUTH, **FORWARDED}, timeout=30)

    # Then the job's URLs use the scheme the client used
    assert response.status_code == 202, response.text
    assert response.json()["urls"]["get"].startswith("https://")
