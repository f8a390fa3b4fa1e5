"""Input images of diffusion jobs: read from data URIs, artifacts and https URLs within the
bounds, refused with a 422 naming the field at create, and read into the job's batch key."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from blaze_jobs.api_keys import create_key
from blaze_jobs.artifacts import ArtifactStore, artifact_key
from blaze_jobs.engines.base import EngineRequest
from blaze_jobs.engines.diffusion_input import _resolve, cacheable, request_key
from blaze_jobs.errors import RequestError
from blaze_jobs.input_images import InputImages, decode_data_uri, open_image, parse_source
from blaze_jobs.keys import Keys
from blaze_jobs.settings import Settings
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


class MemoryStore(ArtifactStore):
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def put(self, data: bytes, extension: str) -> str:
        key = artifact_key(data, extension)
        self.files[key] = data
        return key

    def get(self, key: str) -> bytes | None:
        return self.files.get(key)


def request(**input: Any) -> EngineRequest:
    return EngineRequest(job_id=str(uuid.uuid4()), model="builtin:tiny-sd", input={"prompt": "a fox", **input})


# --- reading --------------------------------------------------------------------------


def test_a_data_uri_decodes_within_its_bounds_and_pixels_are_bounded_from_the_header() -> None:
    data = png(40, 24)
    assert decode_data_uri("input.image", data_uri(data), max_bytes=len(data)) == data
    with pytest.raises(RequestError, match=rf"input.image: .*limit of {len(data) - 1} bytes"):
        decode_data_uri("input.image", data_uri(data), max_bytes=len(data) - 1)
    with pytest.raises(RequestError, match="input.image: over the limit of 10 bytes"):  # refused before decoding
        decode_data_uri("input.image", data_uri(data), max_bytes=10)
    with pytest.raises(RequestError, match="input.mask: a malformed data: URI"):
        decode_data_uri("input.mask", "data:image/png;base64,@@@", max_bytes=10_000)
    with pytest.raises(RequestError, match="image/png, image/jpeg or image/webp"):
        decode_data_uri("input.image", "data:text/html;base64,PGI+", max_bytes=10_000)
    # An 8000x8000 canvas in a file of a few hundred bytes: refused from its header, nothing decoded.
    bomb = io.BytesIO()
    Image.new("1", (8_000, 8_000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(RequestError, match="8000x8000 exceeds the limit of 16777216 pixels"):
        open_image("input.image", bomb.getvalue(), max_pixels=4096 * 4096)
    with pytest.raises(RequestError, match="does not decode"):
        open_image("input.image", b"GIF89a but not really", max_pixels=4096 * 4096)


def test_a_photo_is_read_upright_as_its_exif_orientation_says() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned a quarter: the stored 32x16 shows as 16x32
    buffer = io.BytesIO()
    Image.new("RGB", (32, 16), (10, 200, 10)).save(buffer, format="JPEG", exif=exif)
    image = InputImages(Settings()).read("input.image", data_uri(buffer.getvalue(), "image/jpeg"), "RGB")
    assert (image.size, image.mode) == ((16, 32), "RGB")


def test_the_forms_an_image_may_take() -> None:
    key = "a" * 64 + ".png"
    assert parse_source("input.image", f"/v1/artifacts/{key}").kind == "artifact"
    assert parse_source("input.image", f"/v1/artifacts/{key}?expires=1&signature=x").value == key
    assert parse_source("input.image", f"https://api.example/v1/artifacts/{key}?expires=1").value == key
    assert parse_source("input.image", "https://images.example/cat.png").kind == "https"
    for bad in ("http://images.example/cat.png", "file:///etc/passwd", "ftp://x/y.png", "cat.png"):
        with pytest.raises(RequestError, match="input.image: must be an https URL"):
            parse_source("input.image", bad)
    with pytest.raises(RequestError, match="input.image: no such artifact"):
        parse_source("input.image", "/v1/artifacts/../../secret")
    assert cacheable({"seed": 1, "image": f"/v1/artifacts/{key}"}) and cacheable({"seed": 1, "image": "data:image/png;base64,AA"})
    assert not cacheable({"seed": 1, "image": "https://images.example/cat.png"}) and not cacheable(
        {"image": f"/v1/artifacts/{key}"}
    )


def test_an_artifact_and_a_mask_read_into_the_job_and_its_key() -> None:
    store = MemoryStore()
    key = store.put(png(72, 48), "png")
    images = InputImages(Settings(), artifacts=store)
    mask = io.BytesIO()
    Image.new("L", (36, 24), 255).save(mask, format="PNG")  # half the size: scaled to the image
    inpaint = request(image=f"/v1/artifacts/{key}", mask=data_uri(mask.getvalue()), seed=1)
    job = _resolve(inpaint, default_size=(64, 64), images=images)
    assert (job.task, job.width, job.height, job.strength) == ("inpaint", 72, 48, 0.8)
    assert job.image is not None and job.image.mode == "RGB" and job.image.size == (72, 48)
    assert job.mask is not None and job.mask.mode == "L" and job.mask.size == (72, 48)
    assert request_key(inpaint, default_size=(64, 64)) == job.key
    # Another strength, another batch; a text-to-image request keeps the key it always had.
    img2img = request(image=f"/v1/artifacts/{key}", strength=0.3)
    images.fetch(img2img)
    assert request_key(img2img, default_size=(64, 64)) == _resolve(img2img, default_size=(64, 64)).key
    assert request_key(img2img, default_size=(64, 64))[-2:] == ("img2img", 0.3)
    text = request(width=64, num_inference_steps=5)
    assert (
        request_key(text, default_size=(64, 64))
        == ("builtin:tiny-sd", 64, 64, 5, 7.5)
        == _resolve(text, default_size=(64, 64)).key
    )
    assert request_key(text, default_size=(64, 64), defaults={"guidance_scale": 3.0})[-1] == 3.0
    with pytest.raises(RequestError, match="input.image: no such artifact"):
        images.fetch(request(image="/v1/artifacts/" + "b" * 64 + ".png"))
    with pytest.raises(RequestError, match="input.strength: needs input.image"):
        _resolve(request(strength=0.5), default_size=(64, 64))


def test_the_worker_reads_an_artifact_only_for_a_tenant_that_owns_it() -> None:
    # A job made past the API's check (a batch file's line, a hand-queued message) meets it here.
    store = MemoryStore()
    key = store.put(png(16, 16), "png")
    settings = Settings(redis_prefix=f"test-input-images-{uuid.uuid4().hex[:8]}")
    owners = Keys(settings.redis_prefix).artifact_owners(key)
    with redis.Redis.from_url(settings.redis_url) as client:
        client.sadd(owners, "acme")
        try:
            images = InputImages(settings, artifacts=store)
            theirs = request(image=f"/v1/artifacts/{key}")
            theirs.tenant = "globex"
            with pytest.raises(RequestError, match="input.image: no such artifact"):
                images.fetch(theirs)
            mine = request(image=f"/v1/artifacts/{key}")
            mine.tenant = "acme"
            images.fetch(mine)
            assert mine.fetched["image"].size == (16, 16)
        finally:
            client.delete(owners)


# --- https -------------------------------------------------------------------------------


class _Images(http.server.BaseHTTPRequestHandler):
    image = png(64, 64)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
            return
        if self.path == "/endless":  # no length, bytes past any bound
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            return
        self.send_response(200 if self.path == "/cat.png" else 404)
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def download(images: InputImages, url: str) -> bytes:
    # The test server speaks plain HTTP: fetch through the same client and checks an https URL gets.
    return images._download("input.image", url)


def test_a_url_is_fetched_bounded_without_redirects_and_from_public_addresses_only(server: str) -> None:
    allowed = InputImages(Settings(webhook_allow_private=True, max_input_image_bytes=100_000))
    assert download(allowed, f"http://{server}/cat.png") == _Images.image
    with pytest.raises(RequestError, match="input.image: .* answered 302, a redirect, which is not followed"):
        download(allowed, f"http://{server}/moved")
    with pytest.raises(RequestError, match="input.image: .* answered 404"):
        download(allowed, f"http://{server}/gone.png")
    with pytest.raises(RequestError, match="input.image: over the limit of 100000 bytes"):
        download(allowed, f"http://{server}/endless")
    guarded = InputImages(Settings(webhook_allow_private=False))
    with pytest.raises(RequestError, match="input.image: could not fetch .*127.0.0.1, a loopback"):
        download(guarded, f"http://{server}/cat.png")
    with pytest.raises(RequestError, match="input.image: could not fetch"):  # the same guard, through fetch
        guarded.fetch(request(image=f"https://{server}/cat.png"))


# --- through the API -----------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_refusals_name_their_field_and_another_tenants_artifact_does_not_exist(
    http: httpx.Client, stack: dict[str, Any], settings: Settings
) -> None:
    def post(client: httpx.Client, **input: Any) -> httpx.Response:
        return client.post("/v1/jobs", json={"engine": "diffusion", "input": {"prompt": "a fox", **input}})

    tiny = data_uri(png(16, 16))
    refusals: dict[str, dict[str, Any]] = {
        "input.mask": {"mask": tiny},
        "input.strength": {"strength": 0.5},
        "input.image": {"image": "ftp://images.example/cat.png"},
    }
    for field, input in refusals.items():
        answer = post(http, **input)
        assert answer.status_code == 422 and field in answer.text, (field, answer.text)
    for bad in ("data:image/png;base64,%%%", data_uri(b"not an image"), "file:///etc/passwd"):
        answer = post(http, image=bad)
        assert answer.status_code == 422 and "input.image" in answer.text, answer.text
    answer = post(http, image=tiny, strength=1.5)
    assert answer.status_code == 422 and "strength" in answer.text

    # Tenant A makes an image; tenant B naming it is told there is no such artifact; A may use it.
    clients = []
    with redis.Redis.from_url(settings.redis_url) as client:
        for name in ("acme", "globex"):
            secret, _ = create_key(client, settings, tenant=f"{name}-{uuid.uuid4().hex[:6]}", name="ci")
            clients.append(httpx.Client(base_url=stack["api_url"], timeout=30, headers={"Authorization": f"Bearer {secret}"}))
    acme, globex = clients
    try:
        made = post(acme, width=64, height=64, num_inference_steps=2, seed=int(uuid.uuid4().int % 2**31))
        assert made.status_code == 202, made.text
        job_id = made.json()["id"]
        done = wait_until(
            lambda: (job := acme.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and job,
            timeout=120,
            what="the first image",
        )
        assert done["status"] == "succeeded", done
        url = done["output"]["images"][0]["url"]
        refused = post(globex, image=url)
        assert refused.status_code == 422 and "input.image" in refused.text and "no such artifact" in refused.text
        accepted = post(acme, image=url, strength=0.5, num_inference_steps=2, seed=1)
        assert accepted.status_code == 202, accepted.text
    finally:
        for each in clients:
            each.close()
