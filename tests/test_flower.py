"""Flower shows every job: behind its login, under the job's own id, with the engine's
task name and a short summary of the prompt."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from blaze_jobs.client import BlazeClient
from blaze_jobs.stack import free_port
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(240)

PROMPT = "a lighthouse at dusk"


def test_flower_asks_for_its_login(stack: dict[str, Any]) -> None:
    # When someone without the login asks Flower for the tasks, Then it refuses
    response = httpx.get(f"{stack['flower_url']}/api/tasks", timeout=10)
    assert response.status_code == 401
    # And a wrong password is refused too
    user, _ = stack["flower_auth"]
    wrong = httpx.get(f"{stack['flower_url']}/api/tasks", auth=(user, "wrong"), timeout=10)
    assert wrong.status_code == 401


def test_flowers_password_is_not_on_its_command_line(stack: dict[str, Any]) -> None:
    # Given Flower running with a login
    flower = stack["stack"].child("flower")
    user, password = stack["flower_auth"]

    # When anyone on the machine lists its processes (`ps` reads every process's cmdline)
    cmdline = Path(f"/proc/{flower.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()

    # Then Flower is there, but its password is not
    assert "flower" in cmdline
    assert password not in cmdline
    # and the login is still asked for, and taken
    assert httpx.get(f"{stack['flower_url']}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{stack['flower_url']}/api/workers", auth=(user, password), timeout=10).status_code == 200


def test_flower_will_not_serve_beyond_loopback_without_a_login(test_env: dict[str, str]) -> None:
    # Given no login configured
    env = {k: v for k, v in test_env.items() if k != "BLAZE_FLOWER_BASIC_AUTH"}

    # When the operator asks for Flower on every address
    argv = [sys.executable, "-m", "blaze_jobs.cli", "flower", "--host", "0.0.0.0", "--port", str(free_port())]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    # Then it refuses, saying what to set (an open Flower can revoke and send tasks)
    assert result.returncode == 2
    assert "BLAZE_FLOWER_BASIC_AUTH" in result.stderr


def compose_value(text: str, env: dict[str, str]) -> str:
    """``text`` interpolated as docker compose does: ``${VAR:-default}``, ``${VAR:?error}``."""

    def one(match: re.Match[str]) -> str:
        name, op, rest = match[1], match[2], match[3]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(rest)
        return rest

    return re.sub(r"\$\{(\w+)(:-|:\?)([^}]*)\}", one, text)


def test_the_compose_file_needs_a_login_and_keeps_flower_on_loopback() -> None:
    flower = yaml.safe_load((Path(__file__).parents[1] / "docker-compose.yml").read_text())["services"]["flower"]

    # Given an operator who sets nothing: compose refuses (no default login)
    with pytest.raises(ValueError, match="BLAZE_FLOWER_BASIC_AUTH"):
        compose_value(flower["environment"]["BLAZE_FLOWER_BASIC_AUTH"], {})
    # and once the login is set, Flower (with its unauthenticated /metrics) is published on loopback only
    env = {"BLAZE_FLOWER_BASIC_AUTH": "ops:s3cret"}
    assert compose_value(flower["environment"]["BLAZE_FLOWER_BASIC_AUTH"], env) == "ops:s3cret"
    assert [compose_value(port, env) for port in flower["ports"]] == ["127.0.0.1:5555:5555"]
    # unless the operator chooses to open it
    opened = {**env, "BLAZE_FLOWER_PUBLISH": "0.0.0.0:5555"}
    assert [compose_value(port, opened) for port in flower["ports"]] == ["0.0.0.0:5555:5555"]


def test_the_compose_file_runs_the_api_with_auth_and_needs_its_admin_token() -> None:
    api = yaml.safe_load((Path(__file__).parents[1] / "docker-compose.yml").read_text())["services"]["api"]

    # Given an operator who sets nothing: compose refuses (no default admin token)
    with pytest.raises(ValueError, match="BLAZE_ADMIN_TOKEN"):
        compose_value(api["environment"]["BLAZE_ADMIN_TOKEN"], {})
    # and the API asks every caller for a key, the token being the first one
    assert api["environment"]["BLAZE_AUTH"] == "on"
    assert compose_value(api["environment"]["BLAZE_ADMIN_TOKEN"], {"BLAZE_ADMIN_TOKEN": "t0ken"}) == "t0ken"


def test_flower_lists_each_job_under_its_id_with_its_task_and_prompt(stack: dict[str, Any], client: BlazeClient) -> None:
    # Given an echo job and a diffusion job that both succeeded
    echo = client.submit("echo", {"n": 1})
    image = client.submit("diffusion", {"prompt": PROMPT, "seed": 3, "num_inference_steps": 2})

    def ended(job_id: str) -> dict[str, Any] | None:
        job = client.get(job_id)
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    for job in (echo, image):
        done = wait_until(
            partial(ended, job["id"]),
            timeout=60,
            what=f"{job['engine']} job {job['id']} to end",
        )
        assert done["status"] == "succeeded", done

    # When the operator looks at Flower's task list (Flower learns from events, so poll)
    with httpx.Client(base_url=stack["flower_url"], auth=stack["flower_auth"], timeout=10) as flower:

        def both_succeeded() -> dict[str, Any] | None:
            tasks = flower.get("/api/tasks").json()
            seen = {job_id: tasks.get(job_id, {}).get("state") for job_id in (echo["id"], image["id"])}
            return tasks if set(seen.values()) == {"SUCCESS"} else None

        tasks = wait_until(both_succeeded, timeout=20, what="Flower to show both jobs as SUCCESS", interval=0.2)

    # Then each job is a task under the job's own id, named for its engine
    assert tasks[echo["id"]]["name"] == "blaze.echo.generate"
    assert tasks[image["id"]]["name"] == "blaze.diffusion.generate"
    # And the operator can tell the image job by its prompt, and which worker ran it
    assert PROMPT in tasks[image["id"]]["kwargs"]
    # and whose tenant's job it is (the admin token's tenant here)
    assert tasks[image["id"]]["kwargs"] == repr({"summary": PROMPT, "tenant": "default"})
    assert image["id"] in tasks[image["id"]]["args"]
    assert tasks[image["id"]]["worker"].startswith("diffusion-")
    assert tasks[echo["id"]]["worker"].startswith("echo-")
