"""The lines of a batch: the input file's requests read and checked one by one, and the
output and error files' lines, as OpenAI's Batch API writes them.

A malformed line fails itself (``LineError``: its error-file line says why); a file that is no
batch file at all fails the batch (``BatchFileError``: an entry of its ``errors``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
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


def read_lines(
    content: bytes, *, endpoint: str, max_requests: int, max_line_bytes: int
) -> tuple[list[tuple[int, str, dict[str, Any]]], list[dict[str, Any]]]:
    """The requests of a batch file: ``(line number, custom_id, body)`` of each good line, and
    the error-file line of each malformed one (longer than ``max_line_bytes``, bad JSON, no
    ``custom_id`` or one over ``MAX_CUSTOM_ID`` characters, one used before, a method other
    than POST, a ``url`` not the batch's ``endpoint``, a body that is no object).
    BatchFileError for a file that is no batch file at all (not UTF-8 text, no request line,
    more than ``max_requests``)."""
    try:
        lines = content.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise BatchFileError("invalid_file", f"the input file is not UTF-8 text (byte {error.start})") from None
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise BatchFileError("empty_file", "the input file holds no request lines")
    if len(numbered) > max_requests:
        raise BatchFileError(
            "too_many_requests", f"the input file holds {len(numbered)} requests; a batch takes at most {max_requests}"
        )
    good: list[tuple[int, str, dict[str, Any]]] = []
    bad: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, line in numbered:
        custom_id: str | None = None
        try:
            # A line is one request: no larger than the API takes a request body.
            if len(line) * 4 > max_line_bytes and len(line.encode()) > max_line_bytes:
                raise LineError("line_too_large", f"line {number} is over {max_line_bytes} bytes")
            try:
                request = json.loads(line)
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
        good.append((number, custom_id, body))
    return good, bad


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
