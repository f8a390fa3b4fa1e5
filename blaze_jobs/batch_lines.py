"""The lines of a batch: the input file's requests read and checked one by one, and the
output and error files' lines, as OpenAI's Batch API writes them.

A malformed line fails itself (``LineError``: its error-file line says why); a file that is no
batch file at all fails the batch (``BatchFileError``: an entry of its ``errors``).
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

#: The longest ``custom_id`` a line may have: it is kept in the line's job record and its
#: output line, so it is bounded like any field the API stores.
MAX_CUSTOM_ID = 512


class BatchFileError(Exception):
    """The input file as a whole cannot be a batch: the batch fails with this in ``errors``."""

    def __init__(self, code: str, message: str, *, line: int | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.line, self.param = code, message, line, param

    def entry(self) -> dict[str, Any]:
        """The entry of the batch's ``errors.data`` (OpenAI's ``BatchError``)."""
        return {"code": self.code, "message": self.message, "line": self.line, "param": self.param}


class LineError(Exception):
    """One input line cannot be a request: that line goes to the error file, the rest run."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def request_id(job_id: str) -> str:
    """The output line id of the request a job answers (OpenAI's ``batch_req_...``)."""
    return "batch_req_" + job_id.replace("-", "")


# --- the input file -------------------------------------------------------------------------


#: Bytes of the input file checked as UTF-8 at a time (the whole file is never decoded at once).
DECODE_CHUNK = 1 << 20
_NOT_BLANK = re.compile(rb"^[ \t\r\f\v]*[^\s]", re.MULTILINE)


@dataclass(frozen=True)
class Line:
    """A good request line: its number, ``custom_id``, the ``engine`` its body names (if a
    string), and where its bytes lie in the file (``body_of`` reads it again)."""

    number: int
    custom_id: str
    engine: str | None
    start: int
    end: int


def lines_of(content: bytes) -> Iterator[tuple[int, int, int]]:
    """``(line number, start, end)`` of each line of the file that is not blank, split at
    ``\n`` (a ``\r`` before it is the line's end too), without copying the file."""
    number, start, size = 0, 0, len(content)
    while start < size:
        number += 1
        end = content.find(b"\n", start)
        if end < 0:
            end = size
        stop = end - 1 if end > start and content[end - 1] == 0x0D else end
        if not content[start:stop].isspace() and stop > start:
            yield number, start, stop
        start = end + 1


def scan(content: bytes, *, endpoint: str, max_requests: int, max_line_bytes: int) -> tuple[list[Line], list[dict[str, Any]]]:
    """The requests of a batch file, checked: each good line (``Line``; its body is read again
    a part at a time by ``body_of``, so the parsed file is never held whole), and the
    error-file line of each malformed one (longer than ``max_line_bytes``, bad JSON, no
    ``custom_id`` or one over ``MAX_CUSTOM_ID`` characters, one used before, a method other
    than POST, a ``url`` not the batch's ``endpoint``, a body that is no object).
    BatchFileError for a file that is no batch file at all (not UTF-8 text, no request line,
    more than ``max_requests``). CPU-bound: call it off the event loop."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for at in range(0, len(content), DECODE_CHUNK):
        try:
            decoder.decode(content[at : at + DECODE_CHUNK], final=at + DECODE_CHUNK >= len(content))
        except UnicodeDecodeError as error:
            raise BatchFileError("invalid_file", f"the input file is not UTF-8 text (byte {at + error.start})") from None
    # The lines are counted first (up to one past the bound), so a file past it fails at once.
    requests = sum(1 for _ in itertools.islice(_NOT_BLANK.finditer(content), max_requests + 1))
    if not requests:
        raise BatchFileError("empty_file", "the input file holds no request lines")
    if requests > max_requests:
        raise BatchFileError(
            "too_many_requests", f"the input file holds more than {max_requests} requests; a batch takes at most {max_requests}"
        )
    good: list[Line] = []
    bad: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, start, end in lines_of(content):
        custom_id: str | None = None
        try:
            # A line is one request: no larger than the API takes a request body.
            if end - start > max_line_bytes:
                raise LineError("line_too_large", f"line {number} is over {max_line_bytes} bytes")
            try:
                request = json.loads(content[start:end])
            except (ValueError, RecursionError):
                raise LineError("invalid_json", f"line {number} is not valid JSON") from None
            if not isinstance(request, dict):
                raise LineError("invalid_request", f"line {number} is not a JSON object")
            found = request.get("custom_id")
            if not isinstance(found, str) or not found:
                raise LineError("missing_custom_id", f"line {number}: custom_id must be a non-empty string")
            if len(found) > MAX_CUSTOM_ID:
                raise LineError("invalid_custom_id", f"line {number}: custom_id is over {MAX_CUSTOM_ID} characters")
            custom_id = found  # the error line names it, though an earlier line's is the same
            if found in seen:
                raise LineError("duplicate_custom_id", f"line {number}: custom_id {found!r} is used by an earlier line")
            seen.add(found)
            if request.get("method", "POST") != "POST":
                raise LineError("invalid_method", f"line {number}: method must be POST, not {request.get('method')!r}")
            if request.get("url") != endpoint:
                raise LineError(
                    "invalid_url", f"line {number}: url {request.get('url')!r} is not the batch's endpoint {endpoint}"
                )
            body = request.get("body")
            if not isinstance(body, dict):
                raise LineError("invalid_body", f"line {number}: body must be a JSON object")
        except LineError as error:
            bad.append(error_line(custom_id, code=error.code, message=error.message))
            continue
        engine = body.get("engine")
        good.append(Line(number, found, engine if isinstance(engine, str) else None, start, end))
    return good, bad


def bodies_of(content: bytes, lines: list[Line]) -> list[dict[str, Any]]:
    """The bodies of good lines (``scan`` checked them), parsed again. CPU-bound: call it off
    the event loop."""
    return [json.loads(content[line.start : line.end])["body"] for line in lines]


def error_line(custom_id: str | None, *, code: str, message: str) -> dict[str, Any]:
    """The error-file line of a request that made no job."""
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def response_line(job_id: str, custom_id: str, *, status_code: int, body: Any) -> dict[str, Any]:
    """The output (200) or error-file (otherwise) line of a request whose job ended."""
    return {
        "id": request_id(job_id),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": job_id, "body": body},
        "error": None,
    }


def jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)
