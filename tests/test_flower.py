"""Flower shows every job: behind its login, under the job's own id, with the engine's
task name and a short summary of the prompt."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from blaze_jobs.client import BlazeClient
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


def test_flower_lists_each_job_under_its_id_with_its_task_and_prompt(stack: dict[str, Any], client: BlazeClient) -> None:
    # Given an echo job and a diffusion job that both succeeded
    echo = client.submit("echo", {"n": 1})
    image = client.submit("diffusion", {"prompt": PROMPT, "seed": 3, "num_inference_steps": 2})
    for job in (echo, image):
        done = wait_until(
            lambda: (j := client.get(job["id"]))["status"] in ("succeeded", "failed", "canceled") and j,
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
    assert tasks[image["id"]]["kwargs"] == repr({"summary": PROMPT})
    assert image["id"] in tasks[image["id"]]["args"]
    assert tasks[image["id"]]["worker"].startswith("diffusion-")
    assert tasks[echo["id"]]["worker"].startswith("echo-")
