"""What ``blaze submit --wait`` shows while its job waits and runs: on a terminal, a live bar
(the job's place in its queue while queued; denoising steps or tokens while it runs); on
anything else (a pipe, a log, CI), one plain line per change of status.

The job's events (``GET /v1/jobs/{id}/events``) are read on a thread of their own, so the
bar moves on, and the place in the queue (``GET /v1/jobs/{id}/position``) is read again once
a second, while no event comes.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from datetime import datetime
from typing import Any, TextIO

from blaze_jobs.client import ENDED, APIConnectionError, APIError, BlazeClient, ServerEvent, WaitTimeout

#: How often the queue position is read again while the job is queued, and the bar drawn
#: again while no event comes (its clock moves on).
TICK_S = 1.0
#: A job farther back than this is asked for its place every ``FAR_TICK_S`` only: finding it
#: costs Redis time for each message ahead (api/queues.py), and a far place changes slowly.
NEAR_PLACE = 50
FAR_TICK_S = 5.0
#: Least time between two draws of the bar: a text job's events come faster than anyone reads.
DRAW_S = 0.1
BAR_CELLS = 24
#: What an engine's ``job.progress`` counts.
UNITS = {"diffusion": "steps", "llm": "tokens"}


class EventFeed:
    """The job's server-sent events, read on a daemon thread into a queue; ``failed`` holds
    the error that ended the stream early, if one did."""

    def __init__(self, client: BlazeClient, job_id: str) -> None:
        # A client of its own: the main thread keeps using the caller's meanwhile.
        self._client = BlazeClient(client.base_url, api_key=client.api_key, timeout=client.timeout)
        self._job_id = job_id
        self._events: queue.Queue[ServerEvent | None] = queue.Queue()
        self.failed: BaseException | None = None
        self.done = False
        self._thread = threading.Thread(target=self._read, name="blaze-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._client.events(self._job_id):
                self._events.put(event)
        except (APIError, APIConnectionError) as error:
            self.failed = error
        finally:
            self._events.put(None)  # the stream ended: nothing more comes

    def take(self, timeout: float) -> list[ServerEvent]:
        """The events that came, waiting up to ``timeout`` seconds for the first."""
        taken: list[ServerEvent] = []
        try:
            item = self._events.get(timeout=max(0.0, timeout))
            while True:
                if item is None:
                    self.done = True
                else:
                    taken.append(item)
                item = self._events.get_nowait()
        except queue.Empty:
            return taken

    def close(self) -> None:
        self._client.close()


def follow(client: BlazeClient, job: dict[str, Any], *, timeout: float, out: TextIO, live: bool) -> dict[str, Any]:
    """The job once it ended, its progress shown on ``out`` meanwhile: a bar when ``live``,
    else a line per change of status. ``WaitTimeout`` past ``timeout`` seconds."""
    view: Bar | Lines = Bar(out) if live else Lines(out)
    deadline = time.monotonic() + timeout
    feed = EventFeed(client, job["id"])
    progress: dict[str, Any] | None = job.get("progress")
    place: dict[str, Any] | None = None
    next_read = 0.0  # when to read the queue place again
    try:
        while job["status"] not in ENDED:
            # 1. While queued, where the job stands in its queue, once a second (first of all:
            #    a job that starts at once was queued too).
            now = time.monotonic()
            if job["status"] == "queued" and now >= next_read:
                place = _place(client, job["id"], place)
                next_read = now + _read_again_in(place)
            view.show(job, progress=progress, place=place if job["status"] == "queued" else None)
            if now >= deadline:
                raise WaitTimeout(job["id"], job, timeout)
            # 2. Take what the stream brought: status changes carry the job, progress its counts.
            for event in feed.take(min(TICK_S, deadline - now)):
                if event.event == "job.progress":
                    progress = event.data
                elif isinstance(event.data, dict) and "status" in event.data:
                    job = event.data
                    progress = job.get("progress") or progress
            # 3. A stream that ended early (the API went away, say): wait the plain way.
            if feed.done and job["status"] not in ENDED:
                job = client.wait(job["id"], timeout=max(0.0, deadline - time.monotonic()))
    finally:
        feed.close()
        if job["status"] not in ENDED:  # a timeout or Ctrl-C: what is said next needs a line of its own
            view.stop()
    view.end(job, progress=progress)
    return job


def _place(client: BlazeClient, job_id: str, last: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job's place in its queue now; the last one read when it cannot be read this time."""
    try:
        return client.position(job_id)
    except APIConnectionError:
        return last
    except APIError as error:
        if error.status in (404, 405):  # an API from before GET /v1/jobs/{id}/position
            return None
        raise


def _read_again_in(place: dict[str, Any] | None) -> float:
    """Seconds until the place is read again: soon near the head, seldom far back, where each
    message ahead costs Redis time to look past and the place changes slowly."""
    position = place.get("position") if place else None
    far = position > NEAR_PLACE if position else place is not None and place["depth"] > place["scan_limit"]
    return FAR_TICK_S if far else TICK_S


def place_text(place: dict[str, Any] | None, engine: str) -> str:
    """``place 3 of 5 in the diffusion queue`` and the like, from ``GET /v1/jobs/{id}/position``."""
    if place is None:
        return f"in the {engine} queue"
    if place.get("position"):
        return f"place {place['position']} of {place['depth']} in the {engine} queue"
    if place["depth"] > place["scan_limit"]:
        return f"more than {place['scan_limit']} ahead in the {engine} queue ({place['depth']} waiting)"
    # Not in the list, yet queued: a worker has just taken its message.
    return f"being taken from the {engine} queue"


def _counts(job: dict[str, Any], progress: dict[str, Any] | None) -> tuple[int, int] | None:
    """(done, total) of the job's steps or tokens; a job that succeeded did all its steps, and
    a text job as many tokens as its usage says."""
    if not progress or not progress.get("total"):
        return None
    done, total = int(progress["step"]), int(progress["total"])
    if job["status"] == "succeeded":
        usage = (job.get("output") or {}).get("usage") if isinstance(job.get("output"), dict) else None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        done = int(tokens) if job["engine"] == "llm" and isinstance(tokens, int) else total
    return done, total


def _ended_text(job: dict[str, Any]) -> str:
    if job["status"] == "failed" and job.get("error"):
        return f"failed: {job['error']['type']}: {job['error']['message']}"
    run = (job.get("metrics") or {}).get("run_time_s")
    return f"{job['status']} in {run:.2f} s" if run is not None else job["status"]


class Bar:
    """One line on a terminal, drawn again in place (carriage return, erase to its end)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.began = time.monotonic()
        self.drawn_at = 0.0

    def show(self, job: dict[str, Any], *, progress: dict[str, Any] | None, place: dict[str, Any] | None) -> None:
        now = time.monotonic()
        if now - self.drawn_at < DRAW_S:
            return
        self.drawn_at = now
        if job["status"] == "queued":
            self._draw(f"queued   {place_text(place, job['engine'])}")
        else:
            self._draw(self._bar(job, progress, f"{job['status']:<8}"))

    def end(self, job: dict[str, Any], *, progress: dict[str, Any] | None) -> None:
        self._draw(self._bar(job, progress, f"{job['status']:<8}") if job["status"] == "succeeded" else _ended_text(job))
        self.out.write("\n")
        self.out.flush()

    def stop(self) -> None:
        self.out.write("\n")
        self.out.flush()

    def _bar(self, job: dict[str, Any], progress: dict[str, Any] | None, label: str) -> str:
        counts = _counts(job, progress)
        if counts is None:
            if job["status"] == "succeeded":
                return f"{label} [{'#' * BAR_CELLS}] 100%"
            return f"{label} [{'.' * BAR_CELLS}]"
        done, total = counts
        fraction = min(1.0, done / total) if job["status"] != "succeeded" else 1.0
        filled = round(fraction * BAR_CELLS)
        unit = UNITS.get(job["engine"], "")
        return f"{label} [{'#' * filled}{'.' * (BAR_CELLS - filled)}] {fraction:4.0%}  {done}/{total} {unit}".rstrip()

    def _draw(self, text: str) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        clock = f"  {time.monotonic() - self.began:5.1f} s"
        line = (text + clock)[: max(width - 1, 10)]
        self.out.write(f"\r{line}\x1b[K")
        self.out.flush()


class Lines:
    """A line at each change of status (and of queue place, before the job starts)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.said = ""

    def show(self, job: dict[str, Any], *, progress: dict[str, Any] | None, place: dict[str, Any] | None) -> None:
        if job["status"] == "queued":
            # Its first place only: one that changes every second is no change of status.
            if self.said.startswith("queued"):
                return
            again = " again, after a worker fault" if job.get("attempts") else ""
            self._say(f"queued{again}, {place_text(place, job['engine'])}")
        elif job["status"] == "running":
            worker = f" on {job['worker']}" if job.get("worker") else ""
            self._say(f"running{worker} (attempt {job.get('attempts') or 1})")

    def end(self, job: dict[str, Any], *, progress: dict[str, Any] | None) -> None:
        self._say(_ended_text(job))

    def stop(self) -> None:
        """Nothing to close: each line ended as it was said."""

    def _say(self, what: str) -> None:
        if what == self.said:
            return
        self.said = what
        stamp = datetime.now().strftime("%H:%M:%S")
        self.out.write(f"{stamp} {what}\n")
        self.out.flush()
