"""A real webhook receiver for tests and benchmarks: an HTTP server on 127.0.0.1 in a thread
that records every request and answers each path as a test scripts it."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    #: Hold the request this long before answering.
    delay_s: float = 0.0
    #: Send ``TRICKLED`` (a whole answer of its own) a byte at a time, this long apart.
    trickle_s: float = 0.0

    TRICKLED: ClassVar[bytes] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float  # time.time() when the request had been read


class Receiver:
    """``url(path)`` to hand out; ``answer(path, ...)`` to script; ``wait_for(path, n)`` to read."""

    def __init__(self) -> None:
        self._answers: dict[str, deque[Answer]] = defaultdict(deque)
        self._received: dict[str, list[Received]] = defaultdict(list)
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                got = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver._cond:
                    scripted = receiver._answers[self.path]
                    answer = scripted.popleft() if scripted else Answer()
                    receiver._received[self.path].append(got)
                    receiver._cond.notify_all()
                if answer.delay_s:
                    time.sleep(answer.delay_s)
                try:
                    if answer.trickle_s:
                        for byte in answer.TRICKLED:
                            self.wfile.write(bytes([byte]))
                            time.sleep(answer.trickle_s)
                        self.close_connection = True
                        return
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False  # a scripted hang must not hold up the test's end
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def answer(self, path: str, *answers: Answer) -> None:
        """Answer the next requests to ``path`` with these, in order (then 200)."""
        with self._cond:
            self._answers[path].extend(answers)

    def received(self, path: str) -> list[Received]:
        with self._cond:
            return list(self._received[path])

    def wait_for(self, path: str, count: int, *, timeout: float) -> list[Received]:
        """The first ``count`` requests to ``path``; fails saying what came if they do not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._received[path]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [(r.headers.get("webhook-id"), r.body[:80]) for r in self._received[path]]
                    raise AssertionError(f"{path}: wanted {count} requests in {timeout} s, got {len(got)}: {got}")
                self._cond.wait(left)
            return list(self._received[path][:count])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verified(secret: str, request: Received) -> dict[str, Any]:
    """The event of ``request``, verified with the Standard Webhooks reference library."""
    from standardwebhooks import Webhook

    return Webhook(secret).verify(request.body, request.headers)


def path() -> str:
    """A receiver path of the test's own."""
    return f"/hook/{uuid.uuid4().hex[:8]}"


def without_urls(job: dict[str, Any]) -> dict[str, Any]:
    """A job with its URLs (which carry the host a client used) left out, for comparing."""
    images = [{k: v for k, v in image.items() if k != "url"} for image in (job["output"] or {}).get("images", [])]
    return {**job, "urls": None, "output": {**(job["output"] or {}), "images": images}}
