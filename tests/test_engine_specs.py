"""Engine specs: every part of Blaze Jobs that knows about engines reads the registered specs
(``blaze_jobs.engines.SPECS``), so a new engine is one module, one registry line and its tests.
These stories check that each part follows the registry, and that a spec the registry has
never seen (a test-only engine) gets a create model, bounds, a cache rule and a batcher."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from blaze_jobs import artifacts, cache
from blaze_jobs.api import bounds
from blaze_jobs.api.problems import InputProblem
from blaze_jobs.batching import Batcher
from blaze_jobs.cli import artifacts_of
from blaze_jobs.engines import SPECS, create_engine, spec_of
from blaze_jobs.engines.base import Engine, EngineRequest
from blaze_jobs.engines.spec import ArtifactKind, Batching, Bound, EngineSpec
from blaze_jobs.jobs import job_create_model
from blaze_jobs.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


# --- a test-only engine: reverses a text -------------------------------------------------


class ReverseInput(BaseModel):
    """Input of a reverse job."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = Field(min_length=1, description="The text to reverse.")


class ReverseSettings(BaseModel):
    reverse_model: str = "builtin:reverse"
    reverse_max_chars: int = 10


class ReverseEngine(Engine):
    def run_batch(self, requests: list[EngineRequest]) -> list[dict[str, Any] | BaseException]:
        return [{"text": r.input["text"][::-1]} for r in requests]


REVERSE = EngineSpec(
    name="reverse",
    input_model=ReverseInput,
    description="A reverse job: the output is the text backwards.",
    batching=Batching.none,
    create=lambda settings, device=None, max_batch=None: ReverseEngine(),
    settings=ReverseSettings,
    default_model_setting="reverse_model",
    bounds=(Bound(ReverseInput, "text", "reverse_max_chars", "characters"),),
    cacheable=lambda input: True,  # reversing is deterministic
    artifacts=(ArtifactKind("wav", "audio/wav"),),
)
ReverseEngine.spec = REVERSE


class ReverseDeploymentSettings(ReverseSettings, Settings):
    """The one settings object with the test engine's fields, as settings.py composes it."""


def test_a_spec_the_registry_never_saw_gets_a_create_model_bounds_and_a_batcher() -> None:
    # Given the registered specs and a test-only one
    body_model = TypeAdapter(job_create_model((*SPECS, REVERSE)))
    settings = ReverseDeploymentSettings(reverse_max_chars=5)

    # When a request names the new engine, Then its input model validates it
    body = body_model.validate_python({"engine": "reverse", "input": {"text": "abc"}})
    assert isinstance(body.input, ReverseInput)
    with pytest.raises(ValidationError):
        body_model.validate_python({"engine": "reverse", "input": {"text": "abc", "extra": 1}})
    # and the spec's bound, read from the settings, refuses what is over it, naming the field
    bounds.check_bounds(body, settings, spec=REVERSE)
    long = body_model.validate_python({"engine": "reverse", "input": {"text": "abcdefgh"}})
    with pytest.raises(InputProblem) as refused:
        bounds.check_bounds(long, settings, spec=REVERSE)
    assert refused.value.field == "input.text" and "8 exceeds the limit of 5 characters" in refused.value.message
    # and its default model is the spec's settings field
    assert REVERSE.default_model(settings) == "builtin:reverse" and REVERSE.allowed_models(settings) == ["builtin:reverse"]

    # When its engine runs behind a batcher, Then the batcher follows the spec's batching
    engine = REVERSE.create(settings)
    batcher = Batcher(engine, max_batch=4, max_wait_ms=1)
    try:
        result = batcher.submit(EngineRequest(job_id="j1", model="builtin:reverse", input={"text": "abc"})).result(timeout=5)
    finally:
        batcher.close()
    assert result.output == {"text": "cba"} and result.batch_size == 1
    assert batcher.batches_run == 0  # run alone on the task thread, not on the device thread


def test_every_registered_engine_is_in_the_openapi_document_with_its_bounds() -> None:
    # Given the API made with bounds of its own
    from blaze_jobs.api.app import create_app

    settings = Settings(max_width=512, llm_max_stop_chars=33, max_sleep_ms=1000)
    document = create_app(settings).openapi()
    schemas = document["components"]["schemas"]

    for spec in SPECS:
        # Then each engine's input model and create request are documented
        assert spec.input_model.__name__ in schemas, spec.name
        create = schemas[spec.input_model.__name__.removesuffix("Input") + "JobCreate"]
        assert create["properties"]["engine"]["const"] == spec.name
        # and each bound states this deployment's value
        for bound in spec.bounds:
            prop = schemas[bound.model.__name__]["properties"][bound.field]
            branch = next(b for b in prop.get("anyOf", [prop]) if b.get("type") != "null")
            keyword = {"string": "maxLength", "array": "maxItems"}.get(branch["type"], "maximum")
            stated = branch["items"]["maxLength"] if bound.items else branch[keyword]
            assert stated == getattr(settings, bound.setting), (spec.name, bound)
    # and the artifact route documents every kind of file an engine makes
    artifact = document["paths"]["/v1/artifacts/{key}"]["get"]["responses"]["200"]["content"]
    assert {kind.content_type for spec in SPECS for kind in spec.artifacts} <= set(artifact)


def test_every_engines_settings_join_the_one_settings_object(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the environment names each engine's default model
    for spec in SPECS:
        monkeypatch.setenv(f"BLAZE_{spec.default_model_setting.upper()}", f"{spec.name}-from-env")
    settings = Settings()

    for spec in SPECS:
        # Then its settings class is a base of Settings (settings.py's one line per engine)
        assert issubclass(Settings, spec.settings), f"{spec.settings.__name__} is missing from Settings' bases"
        # and the default model comes from the settings field the spec names
        assert settings.default_model(spec.name) == spec.default_model(settings) == f"{spec.name}-from-env"
        assert settings.allowed_models(spec.name)[0] == f"{spec.name}-from-env"


def test_the_old_model_variables_still_configure_the_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the variables the docs name
    monkeypatch.setenv("BLAZE_DIFFUSION_MODELS", "a/sd, b/sd")
    monkeypatch.setenv("BLAZE_LLM_MODEL", "gpt2")
    monkeypatch.setenv("BLAZE_LLM_MODELS", "gpt2,distilgpt2")
    monkeypatch.setenv("BLAZE_ECHO_MODEL", "builtin:echo-2")
    settings = Settings()

    # Then each engine's models follow them, the default first
    assert settings.allowed_models("diffusion") == ["builtin:tiny-sd", "a/sd", "b/sd"]
    assert settings.allowed_models("llm") == ["gpt2", "distilgpt2"]
    assert settings.allowed_models("echo") == ["builtin:echo-2"]


def test_every_engine_has_a_queue_a_task_and_a_worker_in_the_compose_file() -> None:
    from blaze_jobs import celeryconfig
    from blaze_jobs.broker import task_name
    from blaze_jobs.celery_app import app
    from blaze_jobs.tasks import deliver_webhook  # noqa: F401  # registers the tasks

    compose = (ROOT / "docker-compose.yml").read_text()
    workers = re.findall(r'command: \["blaze", "worker", "--engine", "(\w+)"', compose)
    for spec in SPECS:
        # Then a task of the engine exists and is routed to the engine's queue
        assert task_name(spec.name) in app.tasks
        assert celeryconfig.task_routes[task_name(spec.name)]["queue"] == spec.queue
        # and the deployment runs a worker of it
        assert spec.name in workers, f"docker-compose.yml runs no worker of {spec.name}"


def test_the_cache_follows_each_specs_rules() -> None:
    settings = Settings()
    for spec in SPECS:
        # Then a seeded request of every engine is cacheable, and an unseeded sampled one is not
        assert cache.cacheable(spec.name, {"seed": 7}) is True
        assert cache.cacheable(spec.name, {"temperature": 1.0}) is False
        # and the inputs that never change the output stay out of the key
        for ignored in spec.not_output:
            inputs = ({"seed": 1, ignored: value} for value in (1, 2))
            assert (
                len({cache.cache_key(engine=spec.name, model="m", input=i, tenant="t", settings=settings) for i in inputs}) == 1
            )
        # and every built-in model's revision is part of its keys
        for builtin in spec.builtin_models:
            assert cache.BUILTIN_REVISIONS[builtin.id] == builtin.revision
    # Then echo's fail requests are never cached and greedy text always is
    assert cache.cacheable("echo", {"seed": 1, "fail": "worker"}) is False
    assert cache.cacheable("llm", {"temperature": 0}) is True
    seeded = {"prompt": "x", "seed": 1}
    revised = Settings(model_revisions={"builtin:tiny-sd": "2"})
    assert cache.cache_key(
        engine="diffusion", model="builtin:tiny-sd", input=seeded, tenant="t", settings=settings
    ) != cache.cache_key(engine="diffusion", model="builtin:tiny-sd", input=seeded, tenant="t", settings=revised)


def test_every_kind_of_artifact_an_engine_makes_is_served_with_its_content_type() -> None:
    for spec in SPECS:
        for kind in spec.artifacts:
            key = artifacts.artifact_key(b"bytes", kind.extension)
            assert artifacts.KEY_PATTERN.fullmatch(key), key
            assert artifacts.content_type(key) == kind.content_type


def test_workers_create_each_engine_through_its_spec() -> None:
    # The echo engine needs no model; the others' creation is covered by their engine tests.
    engine = create_engine("echo", Settings())
    assert engine.spec is spec_of("echo") and engine.name == "echo"
    assert engine.run(EngineRequest(job_id="j", model="builtin:echo", input={"n": 1})) == {"n": 1}
    with pytest.raises(ValueError, match="unknown engine 'nope'"):
        create_engine("nope", Settings())


def test_the_cli_saves_whatever_artifacts_an_output_holds() -> None:
    # Given an output with artifacts at any depth (images, or a future engine's files)
    output = {
        "images": [{"url": "http://h/v1/artifacts/a.png"}, {"url": "http://h/v1/artifacts/b.png"}],
        "audio": {"track": {"url": "http://h/v1/artifacts/c.wav"}, "page": {"url": "http://h/elsewhere"}},
    }
    # Then the CLI finds every one of them, in order, and nothing else
    assert [a["url"].rsplit("/", 1)[1] for a in artifacts_of(output)] == ["a.png", "b.png", "c.wav"]


@pytest.mark.parametrize("module", ["blaze_jobs.api.app", "blaze_jobs.jobs", "blaze_jobs.settings", "blaze_jobs.cli"])
def test_reading_the_specs_imports_no_model_library(module: str) -> None:
    # When a fresh interpreter imports a module that reads the specs
    probe = f"import sys, {module}; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    found = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)

    # Then none of torch, diffusers or transformers is loaded
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


@pytest.mark.parametrize(("module", "other"), [("blaze_jobs.stack", "blaze_jobs.cli"), ("blaze_jobs.cli", None)])
def test_the_stack_does_not_import_the_cli(module: str, other: str | None) -> None:
    # When a fresh interpreter imports the stack (or the CLI) first
    probe = f"import sys, {module}; print('blaze_jobs.cli' in sys.modules and {module!r} != 'blaze_jobs.cli')"
    found = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)

    # Then it imports whole, and the stack never needs the CLI
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "False"
