"""On a fresh machine, with no Redis answering where the tests look, the suite starts a
private one for the run and stops it at the end: the README's test command needs nothing
installed beside the requirements."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from blaze_jobs.stack import Stack, free_port, redis_refusal
from tests.chaos.harness import PrivateRedis

ROOT = Path(__file__).parents[1]

PROBE = """
import os

import redis

from tests.conftest import REDIS_URL


def test_the_redis_the_tests_import_answers():
    assert REDIS_URL == os.environ["BLAZE_TEST_REDIS_URL"] != os.environ["NOBODY_THERE"]
    with redis.Redis.from_url(REDIS_URL) as client:
        assert client.ping()
"""


def processes_in(folder: Path) -> list[str]:
    """Running processes whose working directory is under ``folder`` (redis-server moves into
    its --dir, and rewrites its command line, so that is where it shows)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if Path(os.readlink(f"/proc/{entry}/cwd")).is_relative_to(folder):
                found.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


@pytest.mark.timeout(120)
def test_with_no_redis_where_the_tests_look_they_bring_their_own(tmp_path: Path) -> None:
    # Given nothing listening where BLAZE_TEST_REDIS_URL points
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    (tmp_path / "test_probe.py").write_text(PROBE)
    # (TMPDIR: the private server's files go under this test's folder)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "BLAZE_TEST_REDIS_URL": nobody, "NOBODY_THERE": nobody, "TMPDIR": str(temp)}

    # When a test that uses the suite's Redis runs, with the suite's conftest
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "tests.conftest",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tmp_path),
        str(tmp_path),
    ]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)

    # Then it passed against a private Redis, which is gone once the run ended
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert not processes_in(temp)


@pytest.mark.timeout(60)
def test_a_redis_that_evicts_is_passed_over_for_a_private_one(tmp_path: Path) -> None:
    # Given a Redis that answers but evicts keys (the API and workers would refuse it)
    with Stack(log_dir=tmp_path) as stack:
        evicting = PrivateRedis(
            stack, data_dir=tmp_path / "evicting", persist=False, options=["--maxmemory-policy", "allkeys-lru"]
        )
        evicting.start()
        assert redis_refusal(evicting.url) and "allkeys-lru" in (redis_refusal(evicting.url) or "")

        # When the demo's, up's and the tests' stack looks for a Redis there
        found = stack.redis(evicting.url)

        # Then it starts a private one that keeps keys instead
        assert found != evicting.url and redis_refusal(found) is None
        with redis.Redis.from_url(found) as client:
            assert client.ping()
