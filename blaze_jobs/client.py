"""The Python client of the Blaze Jobs HTTP API."""

from __future__ import annotations

import time
from typing import Any

import httpx

from blaze_jobs.errors import BlazeError

ENDED = ("succeeded", "failed", "canceled")


class APIError(BlazeError):
    """The API answered with a problem: ``status`` is the HTTP status, ``problem`` its body."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {problem.get('detail') or problem.get('title') or problem}")
        self.status = status
        self.problem = problem


class BlazeClient:
    """Submit jobs, follow them and fetch their artifacts over HTTP."""

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> "BlazeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def submit(self, engine: str, input: dict[str, Any], *, model: str | None = None) -> dict[str, Any]:
        """Create a job; returns it as accepted (``queued``)."""
        body: dict[str, Any] = {"engine": engine, "input": input}
        if model:
            body["model"] = model
        return self._json(self.http.post("/v1/jobs", json=body))

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, *, timeout: float = 600.0, interval: float = 0.1) -> dict[str, Any]:
        """The job once it has ended; ``TimeoutError`` if it has not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] in ENDED:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(interval)

    def download(self, url: str) -> bytes:
        """The bytes of an artifact, by the URL in a job's output."""
        response = self.http.get(url)
        if response.status_code != 200:
            self._json(response)
        return response.content

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:200]}
            raise APIError(response.status_code, problem)
        return response.json()
