"""Schemathesis hooks for tests/test_schema.py (loaded through ``SCHEMATHESIS_HOOKS``).

An input image's content is beyond what a JSON schema can say: a string the document allows
for ``input.image`` must still be an image the API can read (a PNG in a ``data:`` URI, an
artifact of the caller's tenant, an https URL on a public host), and a mask or a strength
needs an image. So where a diffusion job's body carries one of them as the schema allows, the
hook makes it a real image, as a client's would be: everything else the generator drew is
sent as drawn, and a value of the wrong type (a negative case) is left for the API to refuse.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import schemathesis
from PIL import Image


def _png_data_uri(mode: str) -> str:
    buffer = io.BytesIO()
    Image.new(mode, (8, 8), 255 if mode == "L" else (120, 60, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE, MASK = _png_data_uri("RGB"), _png_data_uri("L")


@schemathesis.hook
def before_call(ctx: schemathesis.HookContext, case: Any, **kwargs: Any) -> None:
    # Before every call, in every phase (the coverage phase draws no bodies through map_body).
    operation = case.operation
    if (operation.method.upper(), operation.path) == ("POST", "/v1/jobs"):
        real_images(case.body)


def real_images(body: Any) -> None:
    """Make the input images of a diffusion job's ``body`` real ones, in place."""
    job_input = body.get("input") if isinstance(body, dict) and body.get("engine") == "diffusion" else None
    if not isinstance(job_input, dict):
        return
    wants_image = any(job_input.get(name) is not None for name in ("mask", "strength"))
    if _drawn_string(job_input.get("image")) or (wants_image and job_input.get("image") is None):
        job_input["image"] = IMAGE
    if _drawn_string(job_input.get("mask")):
        job_input["mask"] = MASK


def _drawn_string(value: Any) -> bool:
    # A string the schema allows (at least one character); anything else stays as drawn.
    return isinstance(value, str) and len(value) >= 1
