"""Every Redis command each process sends for one unit of work (a job, a round trip), traced
with Redis MONITOR: commands and round trips per process, and one run's commands in order.

Why: a job's latency on a quiet machine is mostly Redis round trips and process wake-ups, so
counting them per process shows where a job costs more than a bare Celery round trip.
MONITOR slows Redis, so trace only outside the measured part of a benchmark.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

#: Outside MULTI/EXEC, commands of one connection closer together than this are taken for
#: one pipelined write; a new round trip takes longer (loopback plus Python). A heuristic:
#: under load a pipeline's commands can drift apart, so the round-trip counts are approximate.
PIPELINE_GAP_S = 60e-6
#: A benchmark run's key prefix (``common.unique_prefix``), left out of the commands shown.
BENCH_PREFIX = re.compile(r"blaze-bench-[\w-]+:")


def socket_owners(pids: dict[str, int]) -> dict[int, str]:
    """Local TCP port -> the name of the process (among ``pids``) that owns the socket."""
    inode_owner: dict[str, str] = {}
    for name, pid in pids.items():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inode_owner[link[8:-1]] = name
        except OSError:
            continue
    owners: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            port, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[9]
            if inode in inode_owner:
                owners[port] = inode_owner[inode]
    return owners


def monitor(redis_url: str, work: Callable[[], None]) -> list[dict[str, Any]]:
    """Every command Redis executed while ``work`` ran (MONITOR; it slows Redis, so never
    during the measured blocks)."""
    token = f"blaze-bench-end-{os.getpid()}-{time.time_ns()}"
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    def listen() -> None:
        with redis.Redis.from_url(redis_url).monitor() as stream:
            ready.set()
            while True:
                command = stream.next_command()
                seen.append(command)
                if token in command["command"]:
                    return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.2)
    work()
    with redis.Redis.from_url(redis_url) as client:
        client.echo(token)
    thread.join(10)
    return seen


def profile(
    redis_url: str, pids: dict[str, int], *, count: int, work: Callable[[], Any], publisher: str, detail: bool = False
) -> dict[str, Any]:
    """Redis commands and round trips per unit of work, per process, over ``count`` runs of
    ``work``; and one run's commands in order, from ``publisher``'s LPUSH of the task. With
    ``detail``, that run shows each command's first argument (a key, a channel) and the
    commands run inside scripts, under the script that ran them."""

    def runs() -> None:
        for _ in range(count):
            work()

    commands = monitor(redis_url, runs)
    owners = socket_owners(pids)
    per_process: dict[str, Counter] = {name: Counter() for name in pids}
    scripted: dict[str, Counter] = {name: Counter() for name in pids}
    trips: Counter = Counter()
    timeline: list[tuple[float, str, str]] = []
    last: dict[str, float] = {}
    in_multi: set[str] = set()
    owner = None
    for command in commands:
        name = command["command"].split(" ", 1)[0].upper()
        if command["client_type"] == "lua":
            # Run inside the EVALSHA just before it: no round trip of its own.
            if owner is not None:
                scripted[owner][name] += 1
                if detail:
                    timeline.append((command["time"], owner, "  ↳ " + described(command["command"])))
            continue
        owner = owners.get(int(command["client_port"])) if command["client_port"].isdigit() else None
        if owner is None or command["command"].startswith("ECHO blaze-bench-end-"):
            owner = None
            continue  # another program's command, or the monitor's own
        per_process[owner][name] += 1
        port = command["client_port"]
        # A MULTI … EXEC block is one write from redis-py: one round trip.
        if port not in in_multi and command["time"] - last.get(port, -1.0) > PIPELINE_GAP_S:
            trips[owner] += 1
        if name == "MULTI":
            in_multi.add(port)
        elif name in ("EXEC", "DISCARD"):
            in_multi.discard(port)
        last[port] = command["time"]
        timeline.append((command["time"], owner, described(command["command"]) if detail else name))
    return {
        "count": count,
        "commands_per_run": {n: round(sum(c.values()) / count, 2) for n, c in per_process.items()},
        "round_trips_per_run": {n: round(trips[n] / count, 2) for n in per_process},
        "commands": per_run(per_process, count),
        "inside_scripts": per_run(scripted, count),
        "timeline_one_run": one_run(timeline, publisher=publisher),
    }


def described(command: str, *, width: int = 90) -> str:
    """A command and its first argument (the key or channel, most often), cut to ``width``;
    an EVALSHA's digest is cut to 8 characters."""
    parts = BENCH_PREFIX.sub("", command).split(" ", 4)
    name = parts[0].upper()
    if name in ("EVALSHA", "EVAL") and len(parts) > 3:
        text = f"{name} {parts[1][:8]} {parts[2]} {parts[3]}"
    else:
        text = " ".join(parts[:2])
    return text if len(text) <= width else text[: width - 1] + "…"


def per_run(counters: dict[str, Counter], count: int) -> dict[str, dict[str, float]]:
    return {n: {k: round(v / count, 2) for k, v in c.most_common()} for n, c in counters.items() if c}


def one_run(timeline: list[tuple[float, str, str]], *, publisher: str) -> list[str]:
    """The commands of one run in the middle of a profile, from the publisher's LPUSH (or the
    MULTI its LPUSH is in, or the script that holds it: the API's create) to the next one's,
    in ms from the first; repeats folded."""
    starts = []
    for i, (_, who, name) in enumerate(timeline):
        if who == publisher and name.split(" ", 1)[0] in ("LPUSH", "EVALSHA"):
            start = i
            for j in range(i - 1, max(-1, i - 12), -1):
                if timeline[j][1] != publisher:
                    continue
                if timeline[j][2].startswith("EXEC"):
                    break
                if timeline[j][2].startswith("MULTI"):
                    start = j
                    break
            starts.append(start)
    if len(starts) < 3:
        return []
    middle = len(starts) // 2
    part = timeline[starts[middle] : starts[middle + 1]]
    lines: list[str] = []
    t0 = part[0][0]
    previous, repeats = None, 0
    for when, who, name in part:
        if (who, name) == previous:
            repeats += 1
            continue
        if repeats:
            lines[-1] += f" ×{repeats + 1}"
        repeats = 0
        previous = (who, name)
        lines.append(f"{(when - t0) * 1000:8.3f} ms  {who:<12} {name}")
    if repeats:
        lines[-1] += f" ×{repeats + 1}"
    return lines


def print_trace(trace: dict[str, Any], *, what: str) -> None:
    """A ``profile``'s commands and round trips per process, then its one run in order."""
    print(f"\nRedis commands per {what}, MONITOR over {trace['count']}:")
    for process, commands in trace["commands"].items():
        sent, trips = trace["commands_per_run"][process], trace["round_trips_per_run"][process]
        print(
            f"  {process:<12} {sent:5.1f} commands in ≈{trips:.1f} round trips: "
            + ", ".join(f"{k} {v:g}" for k, v in commands.items())
        )
        inside = trace["inside_scripts"].get(process)
        if inside:
            print(f"  {'':<12} inside its scripts: " + ", ".join(f"{k} {v:g}" for k, v in inside.items()))
    print("  one of them, command by command (MONITOR slows Redis, so the times are inflated):")
    for line in trace["timeline_one_run"]:
        print("    " + line)
