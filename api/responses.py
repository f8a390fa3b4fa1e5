"""The JSON response the API's routes answer with."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse as _StandardJSONResponse


class JSONResponse(_StandardJSONResponse):
    """Starlette's JSONResponse, rendered by orjson: a job's JSON in about a tenth of the
    standard library's time, which counts on the create path."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # what orjson refuses, such as integers beyond 64 bits in an echo input
            return super().render(content)
