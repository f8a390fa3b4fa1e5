"""Logs: every line one JSON object under ``BLAZE_LOG_FORMAT=json``, and a job's lines carrying
its id, engine, model and worker, from the formatter up to a real worker and API."""

from __future__ import annotations

import json
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from blaze_jobs import logs
from blaze_jobs.stack import Stack
from tests.conftest import AUTH, start_api, unique, wait_until


def record(message: str, *args: object, exc: bool = False, **extra: Any) -> logging.LogRecord:
    """A record as ``logging.getLogger("blaze_jobs.worker").info(message, *args, extra=extra)`` makes it."""
    exc_info = sys.exc_info() if exc else None
    made = logging.getLogger("blaze_jobs.worker").makeRecord(
        "blaze_jobs.worker", logging.INFO, __file__, 1, message, args, exc_info, extra=extra
    )
    return made


def as_json(made: logging.LogRecord) -> dict[str, Any]:
    line = logs.JsonFormatter().format(made)
    assert "\n" not in line, line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        return "<Unprintable>"


# --- the formatter ---------------------------------------------------------------------------


def test_a_json_line_has_time_level_logger_message_process_and_thread() -> None:
    # When a line is logged outside any job, with arguments and a newline in its message
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    line = as_json(record("job %s is %s\nsecond line", "j1", "queued"))

    # Then it is one JSON object with the formatted message, its newline kept inside the string
    assert line["message"] == "job j1 is queued\nsecond line"
    assert (line["level"], line["logger"]) == ("INFO", "blaze_jobs.worker")
    assert (line["process"], line["thread"]) == (record("x").process, threading.current_thread().name)
    # And its time is ISO-8601 UTC with milliseconds
    assert line["ts"].endswith("Z") and len(line["ts"].split(".")[1]) == 4, line["ts"]
    ts = datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert before <= ts <= datetime.now(timezone.utc)
    # And no job's fields, since none is being handled
    assert not {"job", "engine", "model", "worker"} & set(line)


def test_a_json_line_carries_the_job_context_extra_fields_and_the_traceback() -> None:
    # Given a job being handled, its model bound once read
    with logs.job_context(job="job-1", engine="echo", worker="echo-1@host"):
        logs.bind(model="builtin:echo")
        try:
            raise ValueError("bad\ninput")
        except ValueError:
            # When a line is logged with an exception and extra fields, one of which JSON cannot hold
            line = as_json(
                record("failed", exc=True, attempt=2, sizes=[1, 2], when={"a": 1}, unprintable=Unprintable(), huge=2**70)
            )

    # Then it carries the job's fields, the traceback, and the extras as they are
    assert {k: line[k] for k in ("job", "engine", "model", "worker")} == {
        "job": "job-1",
        "engine": "echo",
        "model": "builtin:echo",
        "worker": "echo-1@host",
    }
    assert line["exc"].startswith("Traceback") and "ValueError: bad\ninput" in line["exc"]
    assert (line["attempt"], line["sizes"], line["when"]) == (2, [1, 2], {"a": 1})
    # And what JSON cannot hold is its repr, without losing the rest of the line
    assert line["unprintable"] == "<Unprintable>"
    assert line["huge"] == repr(2**70)


def test_a_line_whose_arguments_do_not_fit_its_message_is_still_one_line() -> None:
    # When a call passes an argument its message cannot take
    bad = record("%d jobs", "many")

    # Then both formats write one line that shows the message and its arguments
    line = as_json(bad)
    assert "%d jobs" in line["message"] and "many" in line["message"]
    text = logs.TextFormatter().format(record("%d jobs", "many"))
    assert "\n" not in text and "%d jobs" in text and "many" in text


def test_a_text_line_about_a_job_ends_with_its_fields_and_others_are_unchanged() -> None:
    # A line about no job reads as it always did
    formatter = logging.Formatter(logs.TEXT_FORMAT)
    plain = record("started")
    assert logs.TextFormatter().format(plain) == formatter.format(plain)
    # A line inside a job's block ends with the job's fields, in a fixed order
    with logs.job_context(job="job-2", engine="echo", worker="w1"):
        logs.bind(model="builtin:echo")
        line = logs.TextFormatter().format(record("started"))
    assert line.endswith("blaze_jobs.worker: started [job=job-2 engine=echo model=builtin:echo worker=w1]"), line
    # And so does a line whose record names a job itself, outside any block
    named = logs.TextFormatter().format(record("received", job="job-3", engine="echo"))
    assert named.endswith("blaze_jobs.worker: received [job=job-3 engine=echo]"), named


# --- the job context -------------------------------------------------------------------------


def test_job_contexts_nest_and_each_block_takes_its_fields_away_however_it_ends() -> None:
    # Given a block about a worker, around Celery's block about a task, around the worker's about its job
    with logs.job_context(worker="w1"):
        with logs.job_context(job="j1"):
            with pytest.raises(RuntimeError), logs.job_context(job="j1", engine="echo"):
                # When the job's model is bound once known, and the job then fails
                logs.bind(model="m1", engine=None)
                assert logs.context() == {"worker": "w1", "job": "j1", "engine": "echo", "model": "m1"}
                raise RuntimeError("the job failed")
            # Then the inner block's own fields are gone, and the model stays with the task's block
            assert logs.context() == {"worker": "w1", "job": "j1", "model": "m1"}
        # And the block about no job in particular never learned the job's model
        assert logs.context() == {"worker": "w1"}
    assert logs.context() == {}
    # And outside any block, binding does nothing: there is no job to bind to
    logs.bind(model="m2")
    assert logs.context() == {}


def test_no_context_crosses_threads_or_passes_from_one_job_to_the_next_in_a_thread() -> None:
    seen: dict[str, dict[str, str]] = {}
    inside, release = threading.Event(), threading.Event()

    def job(job_id: str, *, fail: bool = False) -> None:
        seen[f"{job_id} before"] = logs.context()
        with logs.job_context(job=job_id, engine="echo"):
            logs.bind(model=f"model-of-{job_id}")
            seen[job_id] = logs.context()
            if job_id == "j1":
                inside.set()
                release.wait(10)
            if fail:
                raise RuntimeError(job_id)

    # Given two task threads, one of which runs two jobs in turn, the first of them failing
    with ThreadPoolExecutor(max_workers=1) as one, ThreadPoolExecutor(max_workers=1) as other:
        first = one.submit(job, "j1", fail=True)
        assert inside.wait(10)
        # While j1 runs, the other thread sees none of its fields, nor this one
        other.submit(job, "j3").result(10)
        assert logs.context() == {}
        release.set()
        with pytest.raises(RuntimeError):
            first.result(10)
        one.submit(job, "j2").result(10)

    # Then each job saw exactly its own fields, and j2 nothing left from j1 in the same thread
    assert seen["j1"] == {"job": "j1", "engine": "echo", "model": "model-of-j1"}
    assert seen["j3"] == {"job": "j3", "engine": "echo", "model": "model-of-j3"}
    assert seen["j2 before"] == {} and seen["j2"] == {"job": "j2", "engine": "echo", "model": "model-of-j2"}


# --- real processes --------------------------------------------------------------------------


def json_lines(text: str, *, of: str) -> list[dict[str, Any]]:
    """Every line of a running process's log, parsed; the last one only once it is whole."""
    lines = [line for line in text.split("\n")[:-1] if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a line of {of}'s log is not JSON: {line!r}\n--- log:\n{text[-3000:]}")
    return parsed


@pytest.mark.timeout(120)
def test_a_worker_and_the_api_write_only_json_lines_and_a_jobs_lines_name_it(own_stack: Stack) -> None:
    # Given the API and an echo worker started with BLAZE_LOG_FORMAT=json
    api_url = start_api(own_stack, BLAZE_LOG_FORMAT="json")
    worker = own_stack.blaze("worker-echo", "worker", "--engine", "echo", "--concurrency", "1", BLAZE_LOG_FORMAT="json")

    # When a job runs on the worker
    prompt = unique("a private prompt")
    with httpx.Client(base_url=api_url, timeout=30, headers=AUTH) as http:
        job = http.post("/v1/jobs", json={"engine": "echo", "input": {"text": prompt}}).json()
        done = http.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
    assert done["status"] == "succeeded", done

    # Then Celery's line saying the task succeeded, written from the task thread, names the job,
    # its engine and the worker, and the worker's log is JSON throughout (its start-up banner too)
    def succeeded_line() -> dict[str, Any] | None:
        lines = json_lines(worker.log_path.read_text(), of="the worker")
        return next((line for line in lines if line.get("job") == job["id"] and "succeeded" in line["message"]), None)

    line = wait_until(succeeded_line, timeout=10, what="the worker's line that the job succeeded")
    assert line["logger"] == "celery.app.trace" and line["thread"] != "MainThread", line
    assert (line["engine"], line["model"]) == ("echo", done["model"]), line
    assert line["worker"].startswith("echo-"), line
    lines = json_lines(worker.log_path.read_text(), of="the worker")
    assert any(entry["logger"] == "celery.apps.worker" and "[queues]" in entry["message"] for entry in lines)
    # And so does the line that Celery received it, written before any task thread had it
    received = [entry for entry in lines if entry["logger"] == "celery.worker.strategy" and entry.get("job") == job["id"]]
    assert len(received) == 1 and (received[0]["engine"], received[0]["worker"]) == ("echo", line["worker"]), lines
    # And no line shows the job's input (Celery's records carry the task's arguments: a summary of the prompt)
    assert prompt not in worker.log_path.read_text()

    # And the API's lines, uvicorn's start-up lines among them, are JSON objects too
    api_lines = json_lines(own_stack.child("api").log_path.read_text(), of="the API")
    assert any(entry["logger"] == "uvicorn.error" and "startup complete" in entry["message"] for entry in api_lines)
