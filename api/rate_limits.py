"""Request rates per API key (placeholder until the rate-limit work lands)."""

from __future__ import annotations

from fastapi import Request

from blaze_jobs.api_keys import ApiKey


async def check(request: Request, key: ApiKey) -> None:
    """Raise a 429 problem when ``key`` is past its rate."""
    return None
