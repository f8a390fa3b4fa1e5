"""The ``blaze`` command as a person uses it: the demo, and submit/status/cancel over HTTP."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from blaze_jobs.stack import free_port


def blaze(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blaze_jobs.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(300)
def test_demo_makes_an_image_with_an_embedded_redis(test_env: dict[str, str], tmp_path: Path) -> None:
    # Given no Redis where BLAZE_REDIS_URL points (a port nobody listens on)
    env = {**test_env, "BLAZE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    env.pop("BLAZE_REDIS_PREFIX")
    out = tmp_path / "lighthouse.png"

    # When a newcomer runs the demo
    result = blaze("demo", "a lighthouse at dusk", "--out", str(out), env=env, timeout=280)

    # Then it started its own Redis, made the image, printed the timeline and exited 0
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded Redis" in result.stdout
    for word in ("queued", "started", "finished", "queue time", "run time", "succeeded"):
        assert word in result.stdout
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (64, 64)


@pytest.mark.timeout(120)
def test_submit_wait_status_and_cancel(stack: dict[str, Any], test_env: dict[str, str], tmp_path: Path) -> None:
    env = {**test_env, "BLAZE_API_URL": stack["api_url"]}
    fox = tmp_path / "fox.png"

    # When a user submits an image job and waits for it
    result = blaze(
        "submit", "--engine", "diffusion", "--input", "prompt=a red fox", "--input", "seed=7", "--wait", "--out", str(fox),
        env=env, timeout=100,
    )

    # Then the image is written and the timeline printed
    assert result.returncode == 0, result.stdout + result.stderr
    assert Image.open(io.BytesIO(fox.read_bytes())).size == (64, 64)
    job_id = result.stdout.split()[1]

    # and `blaze status` shows the job, with the seed it was given
    status = blaze("status", job_id, env=env, timeout=30)
    assert status.returncode == 0
    job = json.loads(status.stdout)
    assert job["status"] == "succeeded" and job["input"]["seed"] == 7

    # and canceling it now is refused with a clear message
    cancel = blaze("cancel", job_id, env=env, timeout=30)
    assert cancel.returncode != 0 and "already ended" in cancel.stderr


@pytest.mark.timeout(60)
def test_bad_input_gets_a_message_naming_the_field(stack: dict[str, Any], test_env: dict[str, str]) -> None:
    env = {**test_env, "BLAZE_API_URL": stack["api_url"]}
    result = blaze("submit", "--engine", "diffusion", "--input", "prompt=x", "--input", "width=100000", env=env, timeout=30)
    assert result.returncode == 2
    assert "input.width" in result.stderr


@pytest.mark.timeout(30)
def test_an_unreachable_api_is_a_clear_error(test_env: dict[str, str]) -> None:
    env = {**test_env, "BLAZE_API_URL": f"http://127.0.0.1:{free_port()}"}
    result = blaze("status", "some-job", env=env, timeout=20)
    assert result.returncode == 1
    assert "cannot reach the API" in result.stderr
