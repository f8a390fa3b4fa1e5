"""The ``blaze`` commands that show what goes on, run as a person runs them, against the
session's real stack: ``submit --wait``'s progress (a bar on a terminal, lines elsewhere),
``blaze jobs``, ``blaze workers`` and ``blaze top``, and the queue position behind them."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import uuid
from typing import Any

import fakeredis
import httpx
import pytest

from blaze_jobs import scripts
from blaze_jobs.broker import task_message
from blaze_jobs.client import AsyncBlazeClient, BlazeClient
from blaze_jobs.settings import ENGINES, Settings
from blaze_jobs.stack import free_port
from tests.conftest import ADMIN_TOKEN, AUTH, wait_until
from tests.test_cli import blaze, tenant_key

#: A percentage the bar drew in place: after a carriage return that ends no line.
DRAWN_PERCENT = re.compile(r"\r(?!\n)[^\r\n]*?(\d+)%")


def on_a_terminal(*args: str, env: dict[str, str], timeout: float, stop_after: str | None = None) -> tuple[int, str]:
    """Run ``blaze ARGS`` with a pseudo-terminal (120 columns) as its stdin, stdout and stderr;
    returns its exit code and all it wrote. With ``stop_after``, it gets SIGINT (Ctrl-C) once
    its output holds that text twice."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    argv = [sys.executable, "-m", "blaze_jobs.cli", *args]
    process = subprocess.Popen(argv, env={**env, "TERM": "xterm"}, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    written = b""
    deadline = time.monotonic() + timeout
    interrupted = False
    try:
        while True:
            if time.monotonic() > deadline:
                pytest.fail(f"blaze {' '.join(args)} still running after {timeout} s:\n{written.decode(errors='replace')}")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal's other end has closed it
                    break
                if not chunk:
                    break
                written += chunk
            elif process.poll() is not None:
                break
            if stop_after and not interrupted and written.count(stop_after.encode()) >= 2:
                process.send_signal(signal.SIGINT)
                interrupted = True
        return process.wait(timeout=30), written.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


@pytest.fixture()
def user(stack: dict[str, Any], test_env: dict[str, str], settings: Settings) -> dict[str, str]:
    """The environment of a user of a tenant of their own (so their listings hold only what
    the test made), with their key in BLAZE_API_KEY."""
    key = tenant_key(settings, f"cli-views-{uuid.uuid4().hex[:8]}")
    return {**test_env, "BLAZE_API_URL": stack["api_url"], "BLAZE_API_KEY": key}


@pytest.mark.timeout(90)
def test_submit_wait_off_a_terminal_says_each_change_of_status(user: dict[str, str]) -> None:
    # Given a user whose output goes to a pipe (a log, CI)
    prompt = f"a lighthouse {uuid.uuid4().hex[:6]}"  # never made before: no cache hit

    # When they submit an image job and wait for it
    result = blaze("submit", "--engine", "diffusion", "--input", f"prompt={prompt}", "--wait", env=user, timeout=80)

    # Then stderr has a plain line per change of status, in order, with no bar drawn in place
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split(" ", 1)[1] for line in result.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
    assert lines[0].startswith("queued, ") and "diffusion" in lines[0], result.stderr
    assert lines[-1].startswith("succeeded in "), result.stderr
    assert any(line.startswith("running") for line in lines), result.stderr
    assert len(lines) == len(set(lines)) and "\r" not in result.stderr
    # and stdout has the job's timeline
    assert re.match(r"job \S+ succeeded \(engine diffusion", result.stdout), result.stdout


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("engine", "inputs", "counted"),
    [
        ("diffusion", ("prompt=a red fox", "num_inference_steps=40"), r"\d+/40 steps"),
        ("llm", ("prompt=Once upon a time", "max_new_tokens=300"), r"\d+/300 tokens"),
    ],
    ids=["denoising steps", "tokens"],
)
def test_submit_wait_on_a_terminal_draws_a_bar_up_to_100_percent(
    user: dict[str, str], engine: str, inputs: tuple[str, str], counted: str
) -> None:
    # Given a user at a terminal, and an image job of 40 denoising steps (or a text job of up
    # to 300 tokens), never run before (no cache hit)
    prompt, size = inputs
    args = ("submit", "--engine", engine, "--input", f"{prompt} {uuid.uuid4().hex[:6]}", "--input", size, "--wait")

    # When they submit it and wait
    code, written = on_a_terminal(*args, env=user, timeout=80)

    # Then a bar was drawn in place (carriage returns), counting steps or tokens, and it ended at 100%
    assert code == 0, written
    percents = [int(p) for p in DRAWN_PERCENT.findall(written)]
    assert percents and percents[-1] == 100, written
    assert percents == sorted(percents), percents
    assert re.search(counted, written) and "job " in written and " succeeded " in written, written


@pytest.mark.timeout(60)
def test_a_wait_that_runs_out_says_so_on_a_line_of_its_own(stack: dict[str, Any], user: dict[str, str]) -> None:
    # Given a job that runs for 5 s, When a user at a terminal waits for it at most 1 s
    args = ("submit", "--engine", "echo", "--input", "sleep_ms=5000", "--input", f"tag={uuid.uuid4().hex}", "--wait")
    code, written = on_a_terminal(*args, "--timeout", "1", env=user, timeout=40)

    # Then the bar stops and the message, on a line of its own, says where the job stands
    assert code == 1, written
    said = re.search(r"\n(blaze: job (\S+) still (queued|running) after 1 s)", written)
    assert said and "Traceback" not in written, written
    # and the job goes on
    with BlazeClient(stack["api_url"], api_key=user["BLAZE_API_KEY"]) as client:
        assert client.wait(said[2], timeout=30)["status"] == "succeeded"


def echo_jobs(client: BlazeClient, count: int, *, sleep_ms: int = 0) -> list[dict[str, Any]]:
    return [client.submit("echo", {"sleep_ms": sleep_ms, "i": i, "tag": uuid.uuid4().hex}) for i in range(count)]


@pytest.mark.timeout(60)
def test_jobs_lists_what_the_api_lists_page_by_page(stack: dict[str, Any], user: dict[str, str]) -> None:
    # Given three succeeded jobs of the user's tenant, and one that failed
    with BlazeClient(stack["api_url"], api_key=user["BLAZE_API_KEY"]) as client:
        for job in [*echo_jobs(client, 3), client.submit("echo", {"fail": "request"})]:
            client.wait(job["id"], timeout=30)
        first = client.list_jobs(status="succeeded", limit=2)
        second = client.list_jobs(status="succeeded", limit=2, cursor=first["next_cursor"])

    # When they list their succeeded jobs two at a time
    result = blaze("jobs", "--status", "succeeded", "--limit", "2", env=user, timeout=30)

    # Then the table holds the API's first page, newest first, and says how to get the next
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert rows[0].split()[:3] == ["ID", "STATUS", "ENGINE"]
    assert [row.split()[0] for row in rows[1:]] == [job["id"] for job in first["jobs"]]
    assert all(row.split()[1] == "succeeded" for row in rows[1:])
    assert f"--cursor {first['next_cursor']}" in result.stderr

    # and that cursor gives the API's second page, the last
    more = blaze("jobs", "--status", "succeeded", "--limit", "2", "--cursor", first["next_cursor"], env=user, timeout=30)
    assert more.returncode == 0, more.stderr
    assert [row.split()[0] for row in more.stdout.splitlines()[1:]] == [job["id"] for job in second["jobs"]]
    assert second["next_cursor"] is None and "--cursor" not in more.stderr

    # and the failed job is listed under its own filter
    failed = blaze("jobs", "--status", "failed", env=user, timeout=30)
    assert [row.split()[1] for row in failed.stdout.splitlines()[1:]] == ["failed"], failed.stdout


@pytest.mark.timeout(60)
def test_bad_filters_and_keys_get_clear_messages(stack: dict[str, Any], user: dict[str, str]) -> None:
    # When a filter is no status, or a page bigger than the API allows
    for args, said in (
        (("--status", "done"), "invalid choice: 'done'"),
        (("--limit", "0"), "--limit: must be at least 1"),
        (("--limit", "100000"), "limit"),
        (("--engine", "video"), "invalid choice: 'video'"),
    ):
        result = blaze("jobs", *args, env=user, timeout=30)
        # Then the message names what is wrong, with no traceback, and the exit is non-zero
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert said in result.stderr and "Traceback" not in result.stderr, result.stderr

    # When the key is one the API does not know, for each command
    for command in (("jobs",), ("workers",), ("top", "--once")):
        result = blaze(*command, "--api-key", "bz_live_no-such-key", env=user, timeout=30)
        # Then it says the API refused it, and how to give a key
        assert result.returncode == 2, result.stdout + result.stderr
        assert "HTTP 401" in result.stderr and "BLAZE_API_KEY" in result.stderr
        assert "Traceback" not in result.stderr

    # When the API is not there
    gone = {**user, "BLAZE_API_URL": f"http://127.0.0.1:{free_port()}"}
    for command in (("jobs",), ("workers",), ("top", "--once")):
        result = blaze(*command, env=gone, timeout=30)
        assert result.returncode == 1 and "cannot reach the API" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr

    # And a key that is no admin's is told that workers are an admin's to see
    result = blaze("workers", env=user, timeout=30)
    assert result.returncode == 2 and "HTTP 403" in result.stderr, result.stderr


@pytest.mark.timeout(60)
def test_workers_lists_the_stacks_workers(stack: dict[str, Any], test_env: dict[str, str], http: httpx.Client) -> None:
    # Given the stack's workers, as the API lists them
    admin = {**test_env, "BLAZE_API_URL": stack["api_url"], "BLAZE_API_KEY": ADMIN_TOKEN}
    listed = http.get("/v1/workers").json()["workers"]
    assert {w["engine"] for w in listed} >= set(ENGINES)

    # When an operator lists them
    result = blaze("workers", env=admin, timeout=30)

    # Then each is a row: its name, engine, device, models, breaker state and last beat
    assert result.returncode == 0, result.stderr
    rows = {row.split()[0]: row for row in result.stdout.splitlines()[1:]}
    assert result.stdout.split()[:5] == ["NAME", "ENGINE", "DEVICE", "MODELS", "BREAKER"]
    for worker in listed:
        row = rows[worker["name"]]
        assert row.split()[1:3] == [worker["engine"], worker["device"]], row
        assert " closed " in row and re.search(r"\d+\.\d s ago$", row), row
        for model in worker["models"]:
            assert model in row


def positions(client: BlazeClient, jobs: list[dict[str, Any]]) -> list[int | None]:
    return [client.position(job["id"])["position"] for job in jobs]


@pytest.mark.timeout(90)
def test_top_once_shows_every_queue_with_its_depth_and_the_workers(
    stack: dict[str, Any], test_env: dict[str, str], http: httpx.Client, user: dict[str, str]
) -> None:
    admin = {**test_env, "BLAZE_API_URL": stack["api_url"], "BLAZE_API_KEY": ADMIN_TOKEN}
    with BlazeClient(stack["api_url"], api_key=ADMIN_TOKEN) as client:
        # Given the echo worker (one task thread) busy with a long job, and three jobs behind it
        busy = echo_jobs(client, 1, sleep_ms=40_000)[0]
        wait_until(lambda: client.get(busy["id"])["status"] == "running", timeout=30, what="the long echo job to run")
        waiting = echo_jobs(client, 3)
        try:
            # Then each waiting job knows its place: the first submitted is the next one taken
            assert positions(client, waiting) == [1, 2, 3]
            running = client.position(busy["id"])
            assert running["position"] is None and running["status"] == "running" and running["depth"] == 3

            # When an operator looks at the queues once, after the echo worker's next beat
            # said it holds the job (a worker's state is as of its last beat)
            def echo_busy() -> bool:
                return [w["jobs_held"] for w in client.workers() if w["engine"] == "echo"] == [1]

            wait_until(echo_busy, timeout=30, what="the echo worker to say it holds a job", interval=0.5)
            result = blaze("top", "--once", env=admin, timeout=30)

            # Then every engine's queue is shown, echo's with its three jobs and the age of the
            # oldest, and every worker below
            assert result.returncode == 0, result.stderr
            queues = {
                line.split()[0]: line.split()[1:]
                for line in result.stdout.splitlines()
                if line.split()[:1] in [[e] for e in ENGINES]
            }
            assert set(queues) == set(ENGINES), result.stdout
            # (depth 3, its age in seconds, one worker, its breaker not open, holding one job)
            assert queues["echo"][0] == "3" and queues["echo"][2:] == ["s", "1", "0", "1"], queues
            for worker in http.get("/v1/workers").json()["workers"]:
                assert worker["name"] in result.stdout

            # and the API's queue view agrees, naming the oldest waiting job, though not to
            # another tenant's key, which sees only how deep the queue is
            echo = next(q for q in client.queues() if q["engine"] == "echo")
            assert echo["depth"] == 3 and echo["oldest_job_id"] == waiting[0]["id"] and echo["oldest_age_s"] >= 0
            with BlazeClient(stack["api_url"], api_key=user["BLAZE_API_KEY"]) as other:
                seen = next(q for q in other.queues() if q["engine"] == "echo")
            assert seen["depth"] == 3 and seen["oldest_job_id"] is None and seen["oldest_age_s"] is not None

            # When the next one is canceled, the others move up only once a worker drops its message
            client.cancel(waiting[0]["id"])
            assert positions(client, waiting[1:]) == [2, 3]
        finally:
            for job in [busy, *waiting]:
                try:
                    client.cancel(job["id"])
                except Exception:  # ended meanwhile
                    pass
        # and once the worker is free again, the queue empties
        wait_until(
            lambda: next(q for q in client.queues() if q["engine"] == "echo")["depth"] == 0,
            timeout=30,
            what="the echo queue to empty",
        )


@pytest.mark.timeout(60)
def test_top_on_a_terminal_redraws_until_ctrl_c(stack: dict[str, Any], test_env: dict[str, str]) -> None:
    admin = {**test_env, "BLAZE_API_URL": stack["api_url"], "BLAZE_API_KEY": ADMIN_TOKEN}

    # When an operator runs `blaze top` at a terminal, and presses Ctrl-C after two frames
    code, written = on_a_terminal("top", "--interval", "0.2", env=admin, timeout=40, stop_after="\x1b[H\x1b[2J")

    # Then it drew frames on a screen of its own, cleared for each, and gave the screen back
    assert code == 0, written
    assert written.startswith("\x1b[?1049h") and written.rstrip().endswith("\x1b[?1049l"), written[-200:]
    frames = written.split("\x1b[H\x1b[2J")[1:]
    assert len(frames) >= 2
    assert all("QUEUE" in frame and "diffusion" in frame and "NAME" in frame for frame in frames[:2])
    assert "Traceback" not in written


@pytest.mark.timeout(60)
def test_top_off_a_terminal_prints_plain_frames_until_ctrl_c(stack: dict[str, Any], test_env: dict[str, str]) -> None:
    admin = {**test_env, "BLAZE_API_URL": stack["api_url"], "BLAZE_API_KEY": ADMIN_TOKEN}
    argv = [sys.executable, "-m", "blaze_jobs.cli", "top", "--interval", "0.2"]
    # When `blaze top` writes to a pipe (a log), and is interrupted after its second frame
    with subprocess.Popen(argv, env=admin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as top:
        try:
            assert top.stdout is not None
            printed: list[str] = []
            while sum(line.startswith("blaze top ") for line in printed) < 2:
                printed.append(top.stdout.readline())
                assert printed[-1], top.stderr.read() if top.stderr else ""
            top.send_signal(signal.SIGINT)
            rest, errors = top.communicate(timeout=20)
        finally:
            if top.poll() is None:
                top.kill()
    # Then it printed frames one after another, with no terminal codes, and stopped cleanly
    assert top.returncode == 0, errors
    assert "QUEUE" in "".join(printed) and "\x1b" not in "".join(printed) + rest and "Traceback" not in errors


def test_the_position_of_another_tenants_job_is_a_404(stack: dict[str, Any], user: dict[str, str]) -> None:
    # Given a job of the default tenant
    with BlazeClient(stack["api_url"], api_key=ADMIN_TOKEN) as admin:
        job = admin.submit("echo", {"n": 1})
    # When another tenant asks where it stands, the answer is that there is no such job
    answer = httpx.get(
        f"{stack['api_url']}/v1/jobs/{job['id']}/position", headers={"Authorization": f"Bearer {user['BLAZE_API_KEY']}"}
    )
    assert answer.status_code == 404
    # and its own tenant reads it
    assert httpx.get(f"{stack['api_url']}/v1/jobs/{job['id']}/position", headers=AUTH).status_code == 200


def test_a_place_is_counted_from_the_next_message_taken_and_looked_for_within_a_bound() -> None:
    # Given a queue of 30 job messages, pushed as the API pushes them (LPUSH; kombu takes from the right)
    client = fakeredis.FakeRedis()
    ids = [str(uuid.uuid4()) for _ in range(30)]
    for job_id in ids:
        client.lpush("q", task_message(job_id=job_id, engine="echo", input={"prompt": f'"id": "{ids[-1]}"'}))
    script = scripts.script(client, "queue_position")

    def place(job_id: str, *, bound: int = 500, widest: int = 8, budget: int = 8_388_608) -> list[int]:
        return [int(n) for n in script(keys=["q"], args=[json.dumps({"id": job_id})[1:-1], bound, 4, widest, budget])]

    # Then the first pushed is place 1 and the last place 30, each in a queue 30 deep, though
    # every prompt names the last job's id (a header is told from a prompt by its quotes)
    assert [place(job_id) for job_id in ids] == [[n, 30] for n in range(1, 31)]
    # and a job farther back than the bound, or not in the queue at all, has no place
    assert place(ids[20], bound=20) == [0, 30]
    assert place(str(uuid.uuid4())) == [0, 30]
    assert [int(n) for n in script(keys=["empty"], args=["x", 500, 4, 8, 1000])] == [0, 0]
    # and reads of at most `widest` messages find the same places
    assert [place(job_id, widest=4) for job_id in ids] == [[n, 30] for n in range(1, 31)]
    # and past the byte budget the scan stops: a place only within the messages it could afford
    size = len(client.lindex("q", -1) or b"")
    assert place(ids[2], budget=3 * size) == [3, 30]
    assert place(ids[3], budget=3 * size) == [0, 30]


@pytest.mark.timeout(60)
def test_the_async_client_reads_the_same_views(stack: dict[str, Any], user: dict[str, str]) -> None:
    # Given a job of the user's tenant
    key = user["BLAZE_API_KEY"]
    with BlazeClient(stack["api_url"], api_key=key) as client:
        job = client.wait(echo_jobs(client, 1)[0]["id"], timeout=30)

        async def read() -> tuple[Any, ...]:
            async with AsyncBlazeClient(stack["api_url"], api_key=key) as aclient:
                page = await aclient.list_jobs(engine="echo", limit=5)
                return page, await aclient.queues(), await aclient.position(job["id"])

        # When the asyncio client reads its list, the queues and the job's place
        page, queues, place = asyncio.run(read())

        # Then it reads what the blocking client reads
        assert page == client.list_jobs(engine="echo", limit=5) and page["jobs"][0]["id"] == job["id"]
        assert [q["engine"] for q in queues] == list(ENGINES)
        assert place == {**client.position(job["id"]), "depth": place["depth"]} and place["position"] is None
    with BlazeClient(stack["api_url"], api_key=ADMIN_TOKEN) as admin:

        async def workers() -> list[dict[str, Any]]:
            async with AsyncBlazeClient(stack["api_url"], api_key=ADMIN_TOKEN) as aclient:
                return await aclient.workers()

        assert {w["name"] for w in asyncio.run(workers())} == {w["name"] for w in admin.workers()}
