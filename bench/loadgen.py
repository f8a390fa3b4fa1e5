"""A small HTTP/1.1 keep-alive load generator for benchmarks against a local server.

N connections each send one request, read the whole response and send the next, for a
warm-up and then a measured window. Requests are encoded once up front (a few bodies,
rotated, when they should differ); responses are parsed only as far as the status line
and ``Content-Length``. Run it in its own process so it never shares the server's event
loop: ``python bench/loadgen.py --port P --path /v1/jobs --body '{...}'`` prints a JSON
summary on stdout and exits 1 when any response was not 2xx or any connection failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Only a server on this machine is ever loaded.
HOST = "127.0.0.1"
#: Bounds that keep a typo from running for hours or opening thousands of sockets.
MAX_SECONDS = 600.0
MAX_CONNECTIONS = 1024
#: No run records more requests than this (a fast local server does a few thousand a second).
MAX_REQUESTS = 5_000_000
#: How long the last responses may take after the window ends before they count as errors.
RESPONSE_TIMEOUT_S = 10.0


def encode_requests(
    *, path: str, bodies: Sequence[bytes], method: str = "POST", host: str = HOST, port: int, headers: Sequence[str] = ()
) -> list[bytes]:
    """Complete HTTP/1.1 requests, one per body, ready to write as they are; ``headers``
    (``"Name: value"``, such as an ``Authorization``) go on every one."""
    extra = "".join(f"{header}\r\n" for header in headers)
    requests = []
    for body in bodies:
        head = (
            f"{method} {path} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            "Content-Type: application/json\r\n"
            "Accept: application/json\r\n"
            f"{extra}"
            f"Content-Length: {len(body)}\r\n"
            "\r\n"
        )
        requests.append(head.encode("latin-1") + body)
    return requests


@dataclass
class Result:
    """What one run measured; ``requests`` and the latencies cover the measured window only."""

    connections: int
    seconds: float
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    #: Seconds per request, 8 bytes each however many there are.
    latencies: array = field(default_factory=lambda: array("d"))
    #: The first response body that was not 2xx, to say why the server refused.
    failure_sample: str = ""
    #: Responses over warm-up and window together, and the generator's own CPU for them.
    responses_total: int = 0
    cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.non_2xx == 0 and self.errors == 0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def summary(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
            "p50_ms": round(self.percentile_ms(0.50), 3),
            "p99_ms": round(self.percentile_ms(0.99), 3),
            "connections": self.connections,
            "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
            "non_2xx": self.non_2xx,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "failure_sample": self.failure_sample,
            # The generator's CPU per response: well under the server's, or it is the bottleneck.
            "responses_total": self.responses_total,
            "client_cpu_us_per_req": round(self.cpu_s / self.responses_total * 1e6, 1) if self.responses_total else None,
        }


class _Clock:
    """The window shared by every connection: warm-up until ``start``, measured until ``end``."""

    def __init__(self, *, warmup: float, seconds: float) -> None:
        now = time.perf_counter()
        self.start = now + warmup
        self.end = self.start + seconds


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server keeps the connection open."""
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    # b"http/1.1 202 accepted\r\n..." -> 202
    status = int(head[9:12])
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError("response without Content-Length (chunked responses are not supported)")
    at += 17
    length = int(head[at : head.index(b"\r\n", at)])
    keep_alive = b"\r\nconnection: close" not in head
    body = await reader.readexactly(length) if length else b""
    return status, body, keep_alive


async def _connection(port: int, requests: list[bytes], offset: int, clock: _Clock, result: Result, budget: list[int]) -> None:
    perf_counter = time.perf_counter
    latencies = result.latencies
    statuses = result.statuses
    count = len(requests)
    i = offset
    writer = None
    try:
        while budget[0] > 0:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
            sent = perf_counter()
            if sent >= clock.end:
                return
            writer.write(requests[i % count])
            i += 1
            status, body, keep_alive = await _read_response(reader)
            done = perf_counter()
            result.responses_total += 1
            if sent >= clock.start and done < clock.end:
                budget[0] -= 1
                result.requests += 1
                latencies.append(done - sent)
                statuses[status] = statuses.get(status, 0) + 1
                if not 200 <= status < 300 and not result.failure_sample:
                    result.failure_sample = f"{status} {body[:500].decode(errors='replace')}"
            elif not 200 <= status < 300:
                # A refusal during the warm-up is a failure too: the server is not ready.
                result.errors += 1
                if not result.failure_sample:
                    result.failure_sample = f"{status} (warm-up) {body[:500].decode(errors='replace')}"
            if not keep_alive:
                writer.close()
                writer = None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as error:
        result.errors += 1
        if len(result.error_samples) < 5:
            result.error_samples.append(f"{type(error).__name__}: {error}")
    finally:
        if writer is not None:
            writer.close()


async def run(
    *,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    connections: int,
    seconds: float,
    warmup: float,
    method: str = "POST",
    headers: Sequence[str] = (),
) -> Result:
    """Load ``http://127.0.0.1:<port><path>`` with ``connections`` keep-alive connections."""
    if not 0 < seconds <= MAX_SECONDS or not 0 <= warmup <= MAX_SECONDS:
        raise ValueError(f"seconds and warm-up must lie within (0, {MAX_SECONDS:.0f}]")
    if not 0 < connections <= MAX_CONNECTIONS:
        raise ValueError(f"connections must lie within [1, {MAX_CONNECTIONS}]")
    if not bodies:
        raise ValueError("at least one body")
    requests = encode_requests(path=path, bodies=bodies, method=method, port=port, headers=headers)
    result = Result(connections=connections, seconds=seconds)
    clock = _Clock(warmup=warmup, seconds=seconds)
    budget = [MAX_REQUESTS]
    cpu_before = _cpu_seconds()
    tasks = [asyncio.create_task(_connection(port, requests, n, clock, result, budget)) for n in range(connections)]
    # Every connection stops at the end of the window; the last responses get RESPONSE_TIMEOUT_S.
    # (One deadline for all: a timeout per request would cost the generator a task each.)
    _, pending = await asyncio.wait(tasks, timeout=warmup + seconds + RESPONSE_TIMEOUT_S)
    for task in pending:
        task.cancel()
    if pending:
        result.errors += len(pending)
        result.error_samples.append(f"{len(pending)} connections got no response within {RESPONSE_TIMEOUT_S:.0f} s")
    await asyncio.gather(*tasks, return_exceptions=True)
    result.cpu_s = _cpu_seconds() - cpu_before
    if budget[0] <= 0:
        # The request cap cut the window short; rate over the time actually measured.
        result.seconds = min(seconds, max(1e-9, (time.perf_counter() - clock.start)))
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP/1.1 keep-alive load on a local server; prints JSON.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--method", default="POST")
    parser.add_argument("--body", action="append", default=[], help="a JSON body; repeat to rotate several")
    parser.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'", help="sent on every request; repeat")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args(argv)
    if any(":" not in header or "\r" in header or "\n" in header for header in args.header):
        parser.error("--header takes 'NAME: VALUE' on one line")
    bodies = [b.encode() for b in args.body] or [b""]
    loop = new_loop()
    try:
        result = loop.run_until_complete(
            run(
                port=args.port,
                path=args.path,
                bodies=bodies,
                connections=args.connections,
                seconds=args.seconds,
                warmup=args.warmup,
                method=args.method,
                headers=args.header,
            )
        )
    finally:
        loop.close()
    json.dump(result.summary(), sys.stdout)
    sys.stdout.write("\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
