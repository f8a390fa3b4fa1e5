"""The web console: its files as the API serves them, and a real headless Chromium using it
against the session stack (submit an image job from the form, watch its row change without a
reload, find its thumbnail; a tenant's key, a prompt written as markup)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, AUTH, unique

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ASSETS = Path(__file__).resolve().parent.parent / "api" / "console"

pytestmark = pytest.mark.timeout(120)


def test_the_console_is_served_with_its_types_and_policy(stack: dict[str, Any]) -> None:
    with httpx.Client(base_url=stack["api_url"], timeout=10) as http:
        # Given no key at all: the console's files are not data, and need none.
        for path in ("/", "/console"):
            page = http.get(path)
            assert page.status_code == 200, path
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            policy = page.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "script-src 'self'" in policy and "img-src 'self'" in policy
            assert "unsafe-inline" not in policy
            assert page.headers["x-content-type-options"] == "nosniff"

        # Every file the page and its modules name is served, with its own type.
        names = set(re.findall(r"console/assets/([\w.-]+)", page.text))
        for script in ASSETS.glob("*.js"):
            names |= set(re.findall(r'from "\./([\w.-]+)"', script.read_text()))
        assert {"console.js", "console.css", "api.js", "jobs.js"} <= names
        types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
        for name in names:
            asset = http.get(f"/console/assets/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-type"] == types[Path(name).suffix], name
            assert asset.headers["x-content-type-options"] == "nosniff"
            assert asset.headers["cache-control"] == "no-cache" and asset.headers["etag"]

        # A browser asking again with its copy's tag gets a 304 and no body.
        again = http.get("/console/assets/console.js", headers={"If-None-Match": asset_etag(http, "console.js")})
        assert again.status_code == 304 and again.content == b""

        # Names that are not the console's files, traversal included, are not found.
        for path in (
            "/console/assets/nope.js",
            "/console/assets/console.py",
            "/console/assets/..%2Fconsole.py",
            "/console/assets/%2e%2e%2f%2e%2e%2fpyproject.toml",
            "/console/assets/../app.py",
        ):
            assert http.get(path).status_code == 404, path

        # The console is not part of the API's contract.
        paths = http.get("/openapi.json").json()["paths"]
        assert not {"/", "/console"} & set(paths) and not any(p.startswith("/console") for p in paths)


def asset_etag(http: httpx.Client, name: str) -> str:
    return http.get(f"/console/assets/{name}").headers["etag"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def watched(page: Any) -> list[str]:
    """The faults the page will show: its script errors, and what its own policy refused."""
    faults: list[str] = []
    page.on("pageerror", lambda error: faults.append(f"page error: {error}"))

    def refused(message: Any) -> None:
        if "Content Security Policy" in message.text:
            faults.append(message.text)

    page.on("console", refused)
    return faults


def sign_in(page: Any, api_url: str, key: str) -> None:
    """Open the console and enter ``key`` in its form."""
    page.goto(api_url + "/")
    page.fill("#key", key)
    page.click("#key-form button")


def test_an_image_job_submitted_from_the_console_goes_live_to_its_thumbnail(stack: dict[str, Any], browser: Any) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    faults = watched(page)

    # Given the console, signed in with a key.
    sign_in(page, stack["api_url"], ADMIN_TOKEN)
    expect(page.locator("#submit-form")).to_be_visible()
    page.evaluate("window.notReloaded = true")

    # When a width the API refuses is submitted, its message shows beside the width field.
    prompt = unique("a console lighthouse")
    page.fill("#diffusion-prompt", prompt)
    page.fill("#diffusion-width", "60")
    page.fill("#diffusion-height", "64")
    page.fill("#diffusion-num_inference_steps", "2")
    page.click("#submit-form button[type=submit]")
    expect(page.locator('.field[data-field="input.width"] .field-error')).to_contain_text("multiple of 8")

    # And when a 64x64, 2-step image job is submitted from the form (each status its row
    # shows is noted as the page changes, however short-lived).
    page.evaluate(
        """() => {
            window.seen = {};
            const note = () => document.querySelectorAll("#jobs tbody tr").forEach((row) => {
                const statuses = (window.seen[row.dataset.jobId] ||= []);
                if (statuses[statuses.length - 1] !== row.dataset.status) statuses.push(row.dataset.status);
            });
            new MutationObserver(note).observe(document.getElementById("jobs"), { childList: true, subtree: true });
        }"""
    )
    page.fill("#diffusion-width", "64")
    page.click("#submit-form button[type=submit]")
    link = page.locator(".form-status a")
    expect(link).to_have_count(1)
    job_id = link.inner_text()
    row = page.locator(f'#jobs tr[data-job-id="{job_id}"]')

    # Then its row shows it queued or running, then succeeded, with no reload of the page.
    expect(row).to_have_attribute("data-status", "succeeded", timeout=60_000)
    expect(row.locator("td.status")).to_have_text("succeeded")
    # And the line under the form follows it too: it names the job's status now, not the one
    # the create answered.
    expect(page.locator(".form-status")).to_have_text(f"Job {job_id} succeeded.")
    seen = page.evaluate("id => window.seen[id]", job_id)
    assert seen[0] in ("queued", "running") and seen[-1] == "succeeded", seen
    assert page.evaluate("window.notReloaded") is True

    # And the gallery shows its thumbnail, at the size of the job's image.
    with httpx.Client(timeout=10, headers=AUTH) as http:
        job = http.get(f"{stack['api_url']}/v1/jobs/{job_id}").json()
    image = job["output"]["images"][0]
    assert (image["width"], image["height"]) == (64, 64)
    thumbnail = page.locator(f'#gallery img[data-job-id="{job_id}"]')
    expect(thumbnail).to_have_count(1)
    # Sized from the job's input before it loads; loaded lazily, so once it is in view.
    assert (thumbnail.get_attribute("width"), thumbnail.get_attribute("height")) == ("64", "64")
    thumbnail.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
    natural = thumbnail.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert natural == [image["width"], image["height"]]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)

    # And the job's own page shows its timeline and the image full size, still without a reload.
    thumbnail.click()
    expect(page.locator("ol.timeline")).to_contain_text("Ended")
    full = page.locator("img.full")
    expect(full).to_have_count(1)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=full.element_handle())
    assert full.evaluate("img => img.naturalWidth") == image["width"]
    expect(page.locator("pre.input")).to_contain_text(prompt)
    expect(page.locator(".job")).not_to_contain_text("null")  # nothing shown for what the job lacks
    assert page.evaluate("window.notReloaded") is True

    # And the workers page lists the stack's diffusion worker with its breaker state.
    page.click('nav a[href="#/workers"]')
    diffusion = page.locator("#workers tbody tr", has_text="diffusion")
    expect(diffusion.first).to_be_visible()
    expect(diffusion.first.locator("td.breaker")).to_have_text(re.compile(r"closed|open|half_open"))
    # With the device's busy share, when the worker reports one (0 to 1, shown in percent).
    with httpx.Client(timeout=10, headers=AUTH) as http:
        workers = http.get(f"{stack['api_url']}/v1/workers").json()["workers"]
    if any("device_busy" in worker for worker in workers):
        expect(page.locator("#workers thead")).to_contain_text("Device busy")
        expect(diffusion.first.locator("td.device-busy")).to_have_text(re.compile(r"^\d{1,3}%$"))
    assert faults == []


def test_a_text_jobs_page_shows_its_text_and_a_refused_key_is_asked_again(stack: dict[str, Any], browser: Any) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(stack["api_url"] + "/console")

    # Given a key the API refuses: the console asks for another, saying why.
    page.fill("#key", "not-a-key")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_contain_text("refused")
    assert page.evaluate("sessionStorage.getItem('blaze.apiKey')") is None

    # When a good key is entered and a text job submitted from the form.
    page.fill("#key", ADMIN_TOKEN)
    page.click("#key-form button")
    page.check("input[name=engine][value=llm]")
    page.fill("#llm-prompt", unique("Once upon a time"))
    page.fill("#llm-max_new_tokens", "8")
    page.click("#submit-form button[type=submit]")
    link = page.locator(".form-status a")
    expect(link).to_have_count(1)
    job_id = link.inner_text()

    # Then its page shows the text it wrote, the same text its record holds.
    link.click()
    expect(page.locator(".facts dd").first).to_have_text("succeeded", timeout=60_000)
    with httpx.Client(timeout=10, headers=AUTH) as http:
        job = http.get(f"{stack['api_url']}/v1/jobs/{job_id}").json()
    assert job["output"]["text"]
    expect(page.locator("pre.text-output")).to_have_text(job["output"]["text"])
    expect(page.locator("div.deliveries")).to_contain_text("No deliveries")

    # And "Forget key" takes the key out of the tab.
    assert page.evaluate("sessionStorage.getItem('blaze.apiKey')") == ADMIN_TOKEN
    page.click("#forget")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('blaze.apiKey')") is None


@pytest.mark.timeout(90)
def test_a_tenants_markup_prompt_stays_text_and_workers_ask_for_an_admin_key(stack: dict[str, Any], browser: Any) -> None:
    from playwright.sync_api import expect

    # Given a tenant's key (no admin) and an image job of that tenant whose prompt is markup.
    with httpx.Client(base_url=stack["api_url"], timeout=10) as http:
        tenant = unique("console").replace(" ", "-")
        made = http.post("/v1/admin/keys", json={"tenant": tenant, "name": "browser"}, headers=AUTH)
        assert made.status_code == 201, made.text
        secret = made.json()["secret"]
        prompt = unique('<img src=x onerror="window.__pwned=1">')
        body = {"engine": "diffusion", "input": {"prompt": prompt, "width": 64, "height": 64, "num_inference_steps": 2}}
        created = http.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {secret}"})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]

    page = browser.new_page()
    faults = watched(page)
    workers_asked: list[str] = []

    def asked(request: Any) -> None:
        if "/v1/workers" in request.url:
            workers_asked.append(request.url)

    page.on("request", asked)

    # When the console is signed in with that key: it is kept in this tab only.
    sign_in(page, stack["api_url"], secret)
    assert page.evaluate("sessionStorage.getItem('blaze.apiKey')") == secret
    assert page.evaluate("localStorage.getItem('blaze.apiKey')") is None

    # Then the job shows in the list and the gallery, and on its own page its prompt is text.
    row = page.locator(f'#jobs tr[data-job-id="{job_id}"]')
    expect(row).to_have_attribute("data-status", "succeeded", timeout=60_000)
    expect(page.locator(f'#gallery img[data-job-id="{job_id}"]')).to_have_attribute("alt", prompt)
    row.locator("td.id a").click()
    expect(page.locator("pre.input")).to_contain_text(json.dumps(prompt))
    expect(page.locator("img.full")).to_have_attribute("alt", prompt)
    assert page.locator('img[src="x"]').count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"

    # And a hash that is no well-formed id shows no job, and no page error.
    page.evaluate("location.hash = '#/jobs/%E0%A4'")
    expect(page.locator("#view")).to_contain_text("No such job")

    # And the workers page says they need an admin key, and asks no more (over ~4 s, past
    # the 3 s its polls would take).
    page.click('nav a[href="#/workers"]')
    expect(page.locator("#view")).to_contain_text("need an admin key")
    page.wait_for_timeout(4000)
    assert len(workers_asked) == 1, workers_asked
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert faults == []


def test_the_event_parser_reads_streams_split_anywhere(stack: dict[str, Any], browser: Any) -> None:
    # The console's own parser, run in the browser, on a stream as the API writes it (with a
    # keep-alive comment and the retry field), cut into pieces at every offset.
    page = browser.new_page()
    page.goto(stack["api_url"] + "/")
    stream = (
        "retry: 1000\n\n"
        ": keep-alive\n\n"
        'id: 1-0\nevent: job\ndata: {"status":"queued"}\n\n'
        'id: 2-0\r\nevent: job.progress\r\ndata: {"step":1,"total":2}\r\n\r\n'
        "event: multi\ndata: a\ndata: b\n\n"
    )
    parsed = page.evaluate(
        """async (stream) => {
            const { parseEvents } = await import("./console/assets/api.js");
            const runs = [];
            for (let cut = 0; cut <= stream.length; cut++) {
                const events = [];
                let rest = parseEvents(stream.slice(0, cut), (e) => events.push(e));
                rest = parseEvents(rest + stream.slice(cut), (e) => events.push(e));
                runs.push(JSON.stringify(events) + "|" + rest);
            }
            return [...new Set(runs)];
        }""",
        stream,
    )
    assert len(parsed) == 1, parsed  # the same events wherever the stream was cut
    events, rest = parsed[0].rsplit("|", 1)
    assert rest == ""
    assert json.loads(events) == [
        {"event": "job", "data": '{"status":"queued"}', "id": "1-0"},
        {"event": "job.progress", "data": '{"step":1,"total":2}', "id": "2-0"},
        {"event": "multi", "data": "a\nb", "id": None},
    ]
