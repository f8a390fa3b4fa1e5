"""The OpenAPI document is the contract: schemathesis (``--checks all``) against a real
``blaze api`` finds nothing, so every request the schema allows is accepted, every one it
forbids is refused, every answer (errors too) is documented, and the schema states this
deployment's own bounds."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from blaze_jobs.stack import Stack
from tests.conftest import ADMIN_TOKEN, AUTH, own_prefix, start_api

pytestmark = pytest.mark.timeout(400)

#: Bounds unlike the defaults, so that the schema is seen to read them from the settings.
#: A wait of 1 s also ends each long-poll on a job that no worker runs within a second.
BOUNDS = {
    "BLAZE_MAX_WAIT_S": "1",
    "BLAZE_LIST_LIMIT_MAX": "20",
    "BLAZE_MAX_OUTPUTS": "4",
    "BLAZE_MAX_WIDTH": "512",
    "BLAZE_MAX_HEIGHT": "512",
    "BLAZE_MAX_PIXELS": str(512 * 512),
    "BLAZE_MAX_SLEEP_MS": "1000",
}
#: Test cases per operation and phase: each bound and type is met in a run, and the run
#: stays around a minute on two busy cores.
MAX_EXAMPLES = 20
#: A fixed seed: a run is reproducible, so CI cannot pass or fail on the draw.
SEED = 20261201


@pytest.fixture(scope="module")
def api_url(test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``blaze api`` alone, with the bounds above, under a key prefix of its own."""
    with (
        own_prefix("schema") as prefix,
        Stack(env={**test_env, "BLAZE_REDIS_PREFIX": prefix}, log_dir=tmp_path_factory.mktemp("schema")) as stack,
    ):
        yield start_api(stack, **BOUNDS)


def property_of(spec: dict[str, Any], model: str, field: str) -> dict[str, Any]:
    """A model's field in the document, its non-null branch when it is optional."""
    prop = spec["components"]["schemas"][model]["properties"][field]
    return next((b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"), prop)


def test_the_schema_states_the_deployments_bounds(api_url: str) -> None:
    # When a client reads the OpenAPI document of an API with bounds of its own
    spec = httpx.get(f"{api_url}/openapi.json", timeout=30).json()

    # Then it states those bounds, not the defaults
    assert property_of(spec, "DiffusionInput", "width")["maximum"] == 512
    assert property_of(spec, "DiffusionInput", "num_outputs")["maximum"] == 4
    assert property_of(spec, "EchoInput", "sleep_ms")["maximum"] == 1000
    assert property_of(spec, "LLMInput", "stop")["items"]["maxLength"] == 64
    parameters = {p["name"]: p["schema"] for p in spec["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert parameters["limit"]["maximum"] == 20
    wait = {p["name"]: p["schema"] for p in spec["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"]}["wait"]
    assert wait["maximum"] == 1


def test_an_integer_written_with_a_zero_fraction_is_an_integer(api_url: str) -> None:
    # Given a body whose integers are written as 2.0 (JSON has one kind of number, and JSON
    # Schema calls 2.0 an integer)
    body = {"engine": "diffusion", "input": {"prompt": "a red fox", "num_outputs": 2.0, "width": 64.0, "seed": 7.0}}

    # When it is posted, Then it is accepted, with the integers as integers
    response = httpx.post(f"{api_url}/v1/jobs", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 202, response.text
    job_input = response.json()["input"]
    assert [job_input[name] for name in ("num_outputs", "width", "seed")] == [2, 64, 7]
    assert all(type(job_input[name]) is int for name in ("num_outputs", "width", "seed"))


def test_schemathesis_finds_no_fault(api_url: str, tmp_path: Path) -> None:
    # Given a real API, When schemathesis runs every check against its OpenAPI document
    command = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{api_url}/openapi.json",
        "--checks=all",
        f"--max-examples={MAX_EXAMPLES}",
        f"--seed={SEED}",
        "--phases=examples,coverage,fuzzing",
        "--workers=1",
        "--request-timeout=10",
        # Every /v1 route wants a key: the admin token reaches them all (the admin routes too).
        f"--header=Authorization: Bearer {ADMIN_TOKEN}",
        "--generation-database=none",
        # An event stream lasts as long as its job, and no worker runs jobs here: the
        # streaming tests read it. OpenAI's creates answer once their job ends (a 504 naming
        # it here, with no worker), and their bodies are OpenAI's contract: test_openai.py.
        # A Replicate prediction's input is its version's (Replicate's contract, with its
        # list: test_replicate.py), so a body the document allows may still be a 422.
        "--exclude-path-regex=(/events|/predictions|/v1/images/generations|/v1/chat/completions|/v1/completions)$",
        "--no-color",
    ]
    # Input images drawn as the schema allows are made real ones (tests/schema_hooks.py).
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schema_hooks", "PYTHONPATH": str(Path(__file__).parent.parent)}
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=360, env=env)

    # Then it finds no failure and no error
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
