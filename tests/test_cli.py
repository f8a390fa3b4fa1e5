"""The ``blaze`` command as a person uses it: the demo, ``blaze up`` and how it stops, and
submit/status/cancel over HTTP."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from blaze_jobs import audit
from blaze_jobs.api_keys import create_key, get_key
from blaze_jobs.settings import Settings
from blaze_jobs.stack import free_port
from tests.conftest import REDIS_URL, own_prefix, wait_until


def blaze(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``blaze ARGS``; past ``timeout`` it is told to stop with SIGTERM (so it stops what
    it started, unlike the SIGKILL of ``subprocess.run``) and the test fails."""
    argv = [sys.executable, "-m", "blaze_jobs.cli", *args]
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                stdout, stderr = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
            pytest.fail(f"blaze {' '.join(args)} still running after {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def demo_env(test_env: dict[str, str], tmp_path: Path, **env: str) -> dict[str, str]:
    """The demo's environment on a machine with no Redis where BLAZE_REDIS_URL points: the
    demo starts one of its own, which is then the first of its children. Its logs go under
    the test's folder (TMPDIR)."""
    demo = {**test_env, "BLAZE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "TMPDIR": str(tmp_path), **env}
    demo.pop("BLAZE_REDIS_PREFIX")
    return demo


@pytest.mark.timeout(300)
def test_demo_makes_an_image_with_an_embedded_redis(test_env: dict[str, str], tmp_path: Path) -> None:
    # Given no Redis where BLAZE_REDIS_URL points (a port nobody listens on)
    env = demo_env(test_env, tmp_path)
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


def tenant_key(settings: Settings, tenant: str) -> str:
    """A new key of ``tenant`` in the test stack's Redis, as `blaze keys create` makes one."""
    with redis.Redis.from_url(settings.redis_url) as client:
        secret, _ = create_key(client, settings, tenant=tenant, name="cli-test")
    return secret


@pytest.mark.timeout(120)
def test_submit_wait_status_and_cancel(
    stack: dict[str, Any], test_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    # Given a user whose API key is in BLAZE_API_KEY
    key = tenant_key(settings, "cli-fox")
    env = {**test_env, "BLAZE_API_URL": stack["api_url"], "BLAZE_API_KEY": key}
    fox = tmp_path / "fox.png"

    # When they submit an image job and wait for it
    result = blaze(
        "submit",
        "--engine",
        "diffusion",
        "--input",
        "prompt=a red fox",
        "--input",
        "seed=7",
        "--wait",
        "--out",
        str(fox),
        env=env,
        timeout=100,
    )

    # Then the image is written and the timeline printed
    assert result.returncode == 0, result.stdout + result.stderr
    assert Image.open(io.BytesIO(fox.read_bytes())).size == (64, 64)
    job_id = result.stdout.split()[1]

    # and `blaze status`, given the key with --api-key instead, shows the job, with the seed it was given
    without = {k: v for k, v in env.items() if k != "BLAZE_API_KEY"}
    status = blaze("status", job_id, "--api-key", key, env=without, timeout=30)
    assert status.returncode == 0, status.stderr
    job = json.loads(status.stdout)
    assert job["status"] == "succeeded" and job["input"]["seed"] == 7

    # and canceling it now is refused with a clear message
    cancel = blaze("cancel", job_id, env=env, timeout=30)
    assert cancel.returncode != 0 and "already ended" in cancel.stderr


@pytest.mark.timeout(60)
def test_a_command_without_a_key_says_how_to_give_one(stack: dict[str, Any], test_env: dict[str, str]) -> None:
    # Given a user who has not set BLAZE_API_KEY
    env = {**test_env, "BLAZE_API_URL": stack["api_url"]}
    env.pop("BLAZE_API_KEY", None)

    # When they submit a job, or give a key the API does not know
    for extra in ((), ("--api-key", "bz_live_no-such-key")):
        result = blaze("submit", *extra, "--engine", "echo", "--input", "n=1", env=env, timeout=30)

        # Then the API refused it (401), and the message says how to send a key
        assert result.returncode == 2, result.stdout + result.stderr
        assert "HTTP 401" in result.stderr
        assert "BLAZE_API_KEY" in result.stderr and "--api-key" in result.stderr


@pytest.mark.timeout(60)
def test_bad_input_gets_a_message_naming_the_field(stack: dict[str, Any], test_env: dict[str, str]) -> None:
    env = {**test_env, "BLAZE_API_URL": stack["api_url"], "BLAZE_API_KEY": test_env["BLAZE_ADMIN_TOKEN"]}
    result = blaze("submit", "--engine", "diffusion", "--input", "prompt=x", "--input", "width=100000", env=env, timeout=30)
    assert result.returncode == 2
    assert "input.width" in result.stderr


@pytest.mark.timeout(30)
def test_an_api_without_auth_listens_on_loopback_only(test_env: dict[str, str]) -> None:
    # Given BLAZE_AUTH=off, under which every caller is an admin
    env = {**test_env, "BLAZE_AUTH": "off"}
    # When the API is asked to listen on every address, it refuses, saying why
    result = blaze("api", "--host", "0.0.0.0", "--port", str(free_port()), env=env, timeout=20)
    assert result.returncode == 2
    assert "BLAZE_AUTH=off" in result.stderr and "loopback" in result.stderr


@pytest.mark.timeout(30)
def test_an_unreachable_api_is_a_clear_error(test_env: dict[str, str]) -> None:
    env = {**test_env, "BLAZE_API_URL": f"http://127.0.0.1:{free_port()}"}
    result = blaze("status", "some-job", env=env, timeout=20)
    assert result.returncode == 1
    assert "cannot reach the API" in result.stderr


@pytest.mark.timeout(300)
def test_a_demo_job_that_fails_shows_the_diffusion_workers_log(test_env: dict[str, str], tmp_path: Path) -> None:
    # Given a watchdog so short that the worker fails the job, on its one attempt, as a worker fault
    env = demo_env(test_env, tmp_path, BLAZE_BATCH_TIMEOUT_S="0.001", BLAZE_MAX_ATTEMPTS="1")

    # When the demo runs
    result = blaze("demo", "a lighthouse at dusk", "--out", str(tmp_path / "x.png"), env=env, timeout=280)

    # Then it says the job failed and shows the log of the worker that ran it (not the API's)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "embedded Redis" in result.stdout
    job_id = re.search(r"submitted job (\S+);", result.stdout)
    assert job_id, result.stdout
    assert "worker log:" in result.stderr
    assert f"blaze.diffusion.generate[{job_id[1]}]" in result.stderr, result.stderr
    assert "Uvicorn running" not in result.stderr


@pytest.mark.timeout(300)
def test_the_demo_stops_with_the_workers_log_when_its_worker_dies(test_env: dict[str, str], tmp_path: Path) -> None:
    # Given a default image model that does not exist, so the diffusion worker exits at start
    missing = tmp_path / "no-such-model"
    env = demo_env(test_env, tmp_path, BLAZE_DIFFUSION_MODEL=str(missing))

    # When the demo runs, willing to wait ten minutes for its job
    result = blaze("demo", "a lighthouse at dusk", "--out", str(tmp_path / "x.png"), "--timeout", "600", env=env, timeout=280)

    # Then it does not wait for a job nothing will run: it stops and shows why the worker died
    assert result.returncode == 1, result.stdout + result.stderr
    assert "worker-diffusion exited" in result.stderr
    assert str(missing) in result.stderr


def status_of(url: str) -> int | None:
    """The status of a GET without credentials; None while nothing answers there."""
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, from /proc; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every process below ``root`` in the process tree, as pid -> start time (to tell a pid
    that was reused), read from /proc rather than from what started them."""
    parents: dict[int, int] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))):
            parents[int(entry)], starts[int(entry)] = stat[1], stat[2]
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = starts[pid]
                frontier.append(pid)
    return found


def running(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[0] != "Z"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_blaze_up_stops_every_child_when_told_to_stop(signum: int, test_env: dict[str, str], tmp_path: Path) -> None:
    # Given `blaze up` running (under a prefix of its own: its workers must not take others' jobs),
    # with no Flower login configured
    with own_prefix("up") as prefix:
        log = tmp_path / "up.log"
        api_port, flower_port = free_port(), free_port()
        argv = [sys.executable, "-m", "blaze_jobs.cli", "up", "--port", str(api_port), "--flower-port", str(flower_port)]
        with open(log, "wb") as out:
            env = {**test_env, "BLAZE_REDIS_PREFIX": prefix, "TMPDIR": str(tmp_path)}
            env.pop("BLAZE_FLOWER_BASIC_AUTH")
            up = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        children: dict[int, int] = {}
        try:
            wait_until(
                lambda: "Ctrl-C stops everything" in log.read_text() or up.poll() is not None,
                timeout=150,
                what="blaze up to be ready",
            )
            assert up.poll() is None, log.read_text()
            children = descendants(up.pid)
            # the API, four workers and Flower
            assert len(children) >= 6, children
            printed = log.read_text()

            # It printed an API key, alone on its line, that the API takes
            key = re.search(r"^(bz_live_\S+)$", printed, re.MULTILINE)
            assert key and f"export BLAZE_API_KEY={key[1]}" in printed, printed
            api = f"http://127.0.0.1:{api_port}"
            assert httpx.get(f"{api}/v1/jobs", headers={"Authorization": f"Bearer {key[1]}"}, timeout=10).status_code == 200
            assert httpx.get(f"{api}/v1/jobs", timeout=10).status_code == 401
            # and the login it made for Flower, which refuses anyone without it
            login = re.search(r"\(login: (\S+) / (\S+)\)", printed)
            assert login, printed
            flower = f"http://127.0.0.1:{flower_port}/api/workers"
            wait_until(lambda: status_of(flower) == 401, timeout=60, what=f"Flower to answer at {flower}")
            assert httpx.get(flower, auth=(login[1], login[2]), timeout=10).status_code == 200

            # When a supervisor, `kill` or a closing terminal sends it the signal
            up.send_signal(signum)

            # Then it stops, and so has every process it started
            up.wait(timeout=200)
            wait_until(
                lambda: not any(running(pid, start) for pid, start in children.items()),
                timeout=30,
                what=f"every child of blaze up ({sorted(children)}) to be gone",
            )
            assert "stopping" in log.read_text()
            # and the key it made is revoked, its making and its end both in the audit trail
            up_settings = Settings(redis_url=REDIS_URL, redis_prefix=prefix)
            with redis.Redis.from_url(REDIS_URL) as client:
                assert get_key(client, up_settings, key[1]) is None
                entries, _ = audit.read(client, up_settings)
            assert [e["action"] for e in entries] == ["key.revoke", "key.create"], entries
            assert entries[0]["target"] == entries[1]["target"]
        finally:
            # Whatever it left behind (it orphaned them all before the fix), by pid; read its
            # children again, since the test may have failed before it first read them.
            if up.poll() is None:
                children = {**descendants(up.pid), **children}
            for pid, start in children.items():
                if running(pid, start):
                    os.kill(pid, signal.SIGKILL)
            if up.poll() is None:
                up.kill()
                up.wait(timeout=10)
