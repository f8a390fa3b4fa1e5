"""The llm engine on the built-in tiny model, called directly (no Redis, no Celery).

Greedy jobs (temperature 0) make the stories exact: the tiny model's greedy text never
reaches an end-of-sequence token within these lengths, so each job runs to its
``max_new_tokens`` unless a stop string, a cancel or a rigged end-of-sequence ends it. Where a
story compares texts computed two ways (batched and alone, the engine and ``generate``), it
first checks that no step was close enough for rounding to decide (tests/test_textgen.py).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from blaze_jobs.builtin_models import builtin_path
from blaze_jobs.engines.base import EngineRequest, OutputFuture
from blaze_jobs.engines.llm import LLMEngine
from blaze_jobs.errors import RequestError, WorkerFault
from tests.test_textgen import LOGIT_TOL, greedy_alone, sampled_alone

MODEL = "builtin:tiny-lm"
PROMPT = "The morning was cold"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[LLMEngine]:
    engine = LLMEngine(model_dir=model_dir, max_batch=8)
    engine.prepare(MODEL)
    yield engine
    engine.close()


def request(job_id: str, *, model: str = MODEL, on_delta: Callable[[str], None] | None = None, **input: Any) -> EngineRequest:
    data = {"prompt": PROMPT, "max_new_tokens": 16, "temperature": 0, **input}
    return EngineRequest(job_id=job_id, model=model, input=data, on_delta=on_delta)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple[Any, Any]:
    """The built-in model and tokenizer, loaded on their own as any saved model is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = builtin_path(MODEL, model_dir)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def greedy_tokens(reference: tuple[Any, Any], prompt: str, n: int) -> list[int]:
    """What ``model.generate`` itself makes of the prompt, greedily, for ``n`` tokens."""
    model, tokenizer = reference
    prompt_ids = tokenizer(prompt).input_ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


def decisive(reference: tuple[Any, Any], prompt: str, n: int) -> bool:
    """Whether every greedy step of the prompt alone leads by more than rounding can move
    (tests/test_textgen.py), so another computation of it must pick the same tokens."""
    model, tokenizer = reference
    return greedy_alone(model, tokenizer(prompt).input_ids, n)[1] > 2 * LOGIT_TOL


@contextmanager
def a_long_job_running(engine: LLMEngine) -> Iterator[None]:
    """A greedy job generating throughout (canceled at the end), so jobs submitted meanwhile
    join a running batch: sharing it is then a matter of steps, not of timing."""
    first_text, done = threading.Event(), threading.Event()
    data = {"prompt": "A long story", "max_new_tokens": 2000, "temperature": 0}
    holder = engine.submit(EngineRequest("holder", MODEL, data, on_delta=lambda _: first_text.set(), should_stop=done.is_set))
    assert first_text.wait(30)
    try:
        yield
    finally:
        done.set()
        holder.result(timeout=30)


@pytest.mark.timeout(60)
def test_the_builtin_model_loads_through_from_pretrained_and_generates_as_generate_does(
    engine: LLMEngine, model_dir: Path, reference: tuple[Any, Any]
) -> None:
    # Given the built-in model, built into the model dir as any saved Hugging Face model
    folder = model_dir / "tiny-lm"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in folder.iterdir()}
    model, tokenizer = reference
    assert model.config.model_type == "llama"
    assert tokenizer.chat_template and len(tokenizer("The morning").input_ids) == 2  # multi-character tokens

    # When a greedy job runs (each step decisive: generate's rounding cannot pick another token)
    assert decisive(reference, PROMPT, 24)
    deltas: list[str] = []
    output = engine.run(request("j1", max_new_tokens=24, on_delta=deltas.append))

    # Then its tokens are the ones model.generate picks, and its usage counts them
    assert output["usage"] == {"prompt_tokens": len(tokenizer(PROMPT).input_ids), "completion_tokens": 24}
    assert output["finish_reason"] == "length"
    assert output["text"] == tokenizer.decode(greedy_tokens(reference, PROMPT, 24))
    # and the streamed pieces make up the text
    assert "".join(deltas) == output["text"] and len(deltas) > 1
    assert "seed" not in output  # greedy: nothing random to report


@pytest.mark.timeout(60)
def test_concurrent_jobs_of_different_lengths_share_the_batch_and_each_gets_its_own_text(
    engine: LLMEngine, reference: tuple[Any, Any]
) -> None:
    # Given eight greedy jobs of different prompts and lengths, each step of each decisive,
    # and what each makes alone
    prompts = [(PROMPT + " and clear" * n, 4 + 5 * n) for n in range(8)]
    assert all(decisive(reference, prompt, length) for prompt, length in prompts)
    jobs = [request(str(n), prompt=prompt, max_new_tokens=length) for n, (prompt, length) in enumerate(prompts)]
    alone = [engine.run(job) for job in jobs]

    # When they run together, joining a running batch
    with a_long_job_running(engine):
        futures = [engine.submit(job) for job in jobs]
        together = [future.result(timeout=30) for future in futures]

    # Then each got exactly what it gets alone, with its own usage
    assert together == alone
    for n, output in enumerate(together):
        assert output["usage"]["completion_tokens"] == 4 + 5 * n
    # and they ran together: every job shared the device with others
    assert min(f.batch_size for f in futures) > 1 and max(f.batch_size for f in futures) <= 8


@pytest.mark.timeout(60)
def test_a_short_job_joins_a_running_long_one_and_finishes_first(engine: LLMEngine) -> None:
    # Given a long job that has produced its first tokens
    first_text = threading.Event()
    long_tokens = [0]
    data = {"prompt": PROMPT, "max_new_tokens": 400, "temperature": 0}
    long = engine.submit(
        EngineRequest(
            "long", MODEL, data, on_delta=lambda _: first_text.set(), on_progress=lambda done, _: long_tokens.__setitem__(0, done)
        )
    )
    assert first_text.wait(30)

    # When a short job arrives (noting, at each of its tokens, how far the long one is)
    seen: list[int] = []
    data = {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0}
    short = engine.submit(EngineRequest("short", MODEL, data, on_progress=lambda *_: seen.append(long_tokens[0])))

    # Then it finishes while the long one still runs, having joined its batch: each of its
    # decoding steps made a token of the long job too
    output = short.result(timeout=30)
    assert not long.done(), "the short job waited for the long one"
    assert output["usage"]["completion_tokens"] == 4 and short.batch_size == 2
    assert [n - seen[0] for n in seen] == [0, 1, 2, 3]
    assert long.result(timeout=30)["usage"]["completion_tokens"] == 400


@pytest.mark.timeout(90)
def test_a_seeded_job_gets_its_text_alone_whatever_shares_its_batch_where_rounding_cannot_decide(
    engine: LLMEngine, reference: tuple[Any, Any]
) -> None:
    # Given seeds whose every draw alone is further from a neighbouring token than batched
    # rounding reaches (tests/test_textgen.py); the random-weight model's flat distributions
    # put about one draw in ten closer, and there batched text may part from solo text
    model, tokenizer = reference
    end = set(model.generation_config.eos_token_id)
    prompt_ids = tokenizer(PROMPT).input_ids
    drawn = {seed: sampled_alone(model, prompt_ids, 12, seed=seed, temperature=1.0, end=end) for seed in range(32)}
    seeds = [seed for seed, (_, closest) in drawn.items() if closest > 1]
    assert len(seeds) >= 4, {seed: closest for seed, (_, closest) in drawn.items()}
    alone = {seed: engine.run(request("a", temperature=1.0, seed=seed, max_new_tokens=12)) for seed in seeds}
    for seed in seeds:
        assert alone[seed]["usage"]["completion_tokens"] == len(drawn[seed][0])
        assert alone[seed]["text"] == tokenizer.decode(drawn[seed][0], skip_special_tokens=True)

    # When they run again, arriving at different moments among unseeded companions
    futures: dict[int, OutputFuture] = {}
    noise = []
    with a_long_job_running(engine):
        for n, seed in enumerate(seeds):
            noise.append(engine.submit(request("noise", temperature=1.2, prompt="Hello! " * (n + 1), max_new_tokens=5 + 7 * n)))
            futures[seed] = engine.submit(request("b", temperature=1.0, seed=seed, max_new_tokens=12))
            time.sleep(0.02)
        for future in [*noise, *futures.values()]:
            future.result(timeout=30)

    # Then each seed gave its text alone, and different seeds different texts
    for seed in seeds:
        assert futures[seed].result(timeout=30) == alone[seed]
        assert alone[seed]["seed"] == seed
    assert min(f.batch_size for f in futures.values()) > 1
    assert len({output["text"] for output in alone.values()}) == len(alone)


@pytest.mark.timeout(30)
def test_a_seeded_job_alone_repeats_exactly_whatever_its_draws(engine: LLMEngine) -> None:
    # Given seeded jobs with a nucleus, every seed (none chosen): alone, nothing else rounds
    first = {seed: engine.run(request("a", temperature=1.0, top_p=0.9, seed=seed, max_new_tokens=24)) for seed in range(4)}

    # When each runs alone again, Then it repeats bit for bit
    assert {
        seed: engine.run(request("b", temperature=1.0, top_p=0.9, seed=seed, max_new_tokens=24)) for seed in range(4)
    } == first


@pytest.mark.timeout(30)
def test_an_unseeded_sampled_job_reports_the_seed_that_reproduces_it(engine: LLMEngine) -> None:
    first = engine.run(request("a", temperature=0.8, max_new_tokens=12))

    again = engine.run(request("b", temperature=0.8, max_new_tokens=12, seed=first["seed"]))

    assert again == first


@pytest.mark.timeout(30)
def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(engine: LLMEngine) -> None:
    # Given the greedy text of a prompt, and a stop string taken from its middle
    full = engine.run(request("full", max_new_tokens=40))["text"]
    stop = full[13:16]
    assert len(stop) == 3 and full.find(stop) >= 1

    # When the job runs with that stop string (and one that never appears)
    deltas: list[str] = []
    output = engine.run(request("stop", max_new_tokens=40, stop=["never there", stop], on_delta=deltas.append))

    # Then the text ends just before the stop string's first appearance
    assert output["text"] == full[: full.find(stop)]
    assert output["finish_reason"] == "stop"
    assert output["usage"]["completion_tokens"] < 40
    # and what was streamed is exactly the text: no piece of the stop string leaked out
    assert "".join(deltas) == output["text"]


@pytest.mark.timeout(30)
def test_chat_messages_are_rendered_with_the_chat_template(engine: LLMEngine) -> None:
    # Given a chat, and the same chat written out as the template renders it
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you today?"}]
    rendered = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello! How are you today?<|im_end|>\n<|im_start|>assistant\n"
    )

    # When both run
    chat = engine.run(EngineRequest("chat", MODEL, {"messages": messages, "max_new_tokens": 12, "temperature": 0}))
    plain = engine.run(request("plain", prompt=rendered, max_new_tokens=12))

    # Then they are the same generation
    assert chat == plain
    assert chat["usage"]["prompt_tokens"] > 20  # the special tokens are single tokens, the rest words


@pytest.mark.timeout(30)
def test_cancel_stops_at_the_next_token_and_keeps_the_text(engine: LLMEngine) -> None:
    # Given a long job that is asked to stop once it has streamed five pieces
    deltas: list[str] = []
    job = EngineRequest(
        job_id="c",
        model=MODEL,
        input={"prompt": PROMPT, "max_new_tokens": 1000, "temperature": 0},
        on_delta=deltas.append,
        should_stop=lambda: len(deltas) >= 5,
    )

    # When it runs
    output = engine.run(job)

    # Then it ended long before its end, canceled, with the text made so far (all of it streamed)
    assert output["finish_reason"] == "canceled"
    assert 5 <= output["usage"]["completion_tokens"] < 1000
    assert output["text"] == "".join(deltas) and output["text"]
    full = engine.run(request("full", max_new_tokens=output["usage"]["completion_tokens"]))
    assert full["text"] == output["text"]


@pytest.mark.timeout(60)
def test_jobs_beyond_max_batch_wait_and_a_canceled_waiting_job_never_runs(model_dir: Path) -> None:
    # Given an engine that runs one sequence at a time, busy with a long job
    engine = LLMEngine(model_dir=model_dir, max_batch=1)
    try:
        started = threading.Event()
        long = engine.submit(request("long", max_new_tokens=200, on_delta=lambda _: started.set()))
        assert started.wait(10)

        # When a second job waits for room and is canceled meanwhile, and a third just waits
        canceled = threading.Event()
        waiting = engine.submit(EngineRequest("w", MODEL, {"prompt": PROMPT, "temperature": 0}, should_stop=canceled.is_set))
        third = engine.submit(request("third", max_new_tokens=3))
        canceled.set()

        # Then the canceled one ends with no text, never having run; the others ran alone
        assert waiting.result(timeout=30) == {
            "text": "",
            "finish_reason": "canceled",
            "usage": {"prompt_tokens": 4, "completion_tokens": 0},
        }
        assert third.result(timeout=30)["usage"]["completion_tokens"] == 3
        assert long.done() and long.batch_size == third.batch_size == 1
    finally:
        engine.close()


@pytest.mark.timeout(60)
def test_a_local_model_path_with_its_own_end_of_sequence_and_context(
    engine: LLMEngine, model_dir: Path, tmp_path: Path, reference: tuple[Any, Any]
) -> None:
    # Given a copy of the built-in model whose end-of-sequence is a token greedy decoding
    # makes (the first after the first token that it had not made before), and another
    # copy whose context holds 10 tokens
    builtin = builtin_path(MODEL, model_dir)
    assert decisive(reference, PROMPT, 48)
    tokens = greedy_tokens(reference, PROMPT, 48)
    k = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    ends_early, short_context = tmp_path / "ends-early", tmp_path / "short-context"
    for copy, file, change in (
        (ends_early, "generation_config.json", {"eos_token_id": [tokens[k]]}),
        (short_context, "config.json", {"max_position_embeddings": 10}),
    ):
        shutil.copytree(builtin, copy)
        settings = json.loads((copy / file).read_text())
        (copy / file).write_text(json.dumps({**settings, **change}))

    # When each runs a long job, loaded by path like any Hugging Face model
    eos = engine.run(request("e", model=str(ends_early), max_new_tokens=50))
    context = engine.run(request("c", model=str(short_context), max_new_tokens=50))

    # Then the first stops at its end-of-sequence token (counted, but not in the text)
    assert eos["finish_reason"] == "stop" and eos["usage"]["completion_tokens"] == k + 1
    assert eos["text"] == reference[1].decode(tokens[:k])
    # and the second stops when its context is full
    assert context["finish_reason"] == "length"
    assert context["usage"] == {"prompt_tokens": 4, "completion_tokens": 7}
    # and the engine kept at most two models (the least recently used left)
    assert engine.loaded_models() == [str(ends_early), str(short_context)]


@pytest.mark.timeout(30)
def test_bad_requests_fail_alone_with_a_request_error(engine: LLMEngine) -> None:
    long_prompt = "the " * 3000  # about 3,000 tokens: beyond the model's 2,048
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": long_prompt}, "leave no room"),
        ({"prompt": PROMPT, "messages": [{"role": "user", "content": "hi"}]}, "exactly one"),
        ({"messages": []}, "messages"),
        ({"prompt": PROMPT, "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": PROMPT, "stop": [""]}, "stop"),
    ]
    good = request("good", max_new_tokens=3)
    results = engine.run_batch([EngineRequest(str(n), MODEL, data) for n, (data, _) in enumerate(cases)] + [good])

    for (data, words), result in zip(cases, results[:-1], strict=True):
        assert isinstance(result, RequestError) and words in str(result), (data, result)
    good_output = results[-1]
    assert not isinstance(good_output, BaseException), good_output
    assert good_output["usage"]["completion_tokens"] == 3


@pytest.mark.timeout(30)
def test_a_model_that_does_not_load_is_a_worker_fault(engine: LLMEngine, tmp_path: Path) -> None:
    with pytest.raises(WorkerFault, match="could not load text model"):
        engine.run(request("x", model=str(tmp_path / "nothing-here")))
    with pytest.raises(RequestError, match="unknown built-in model"):
        engine.run(request("x", model="builtin:huge-lm"))
