"""What a text job's tokens depend on, as it holds on every CPU.

A row's arithmetic in a batch is not bit for bit its arithmetic alone: batched kernels sum in
another order, so its logits move by rounding (``LOGIT_TOL`` bounds it). These tests pin what
does hold exactly: the same composition gives the same logits, and a row's draw depends only
on its own logits, options and seed. The helpers compute a job's tokens alone, with how close
each decision came to going the other way, so engine tests compare texts only where rounding
cannot decide (tests/test_llm_engine.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from blaze_jobs.builtin_models import builtin_path
from blaze_jobs.kvcache import BatchCache
from blaze_jobs.textgen import sample

#: How far a row's logits may move with what shares its batch. Measured: at most 1e-6 with
#: AVX2 kernels and with torch's plain ones (ATEN_CPU_CAPABILITY=default), logits of
#: magnitude about 1.5; ten times that leaves room for other CPUs' kernels.
LOGIT_TOL = 1e-5


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = builtin_path("builtin:tiny-lm", tmp_path_factory.mktemp("models"))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def alone(model: Any, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits before each of ``tokens`` when the prompt runs alone, fed those tokens."""
    with torch.inference_mode():
        cache = BatchCache(model, pad_token_id=0)
        steps = [cache.add([prompt_ids])[0]]
        steps += [cache.step([token])[0] for token in tokens[:-1]]
    return torch.stack(steps)


def greedy_alone(model: Any, prompt_ids: list[int], n: int) -> tuple[list[int], float]:
    """A prompt's greedy tokens alone, and the smallest gap between a step's top two logits."""
    tokens: list[int] = []
    gaps: list[float] = []
    with torch.inference_mode():
        cache = BatchCache(model, pad_token_id=0)
        logits = cache.add([prompt_ids])[0]
        for _ in range(n):
            top = logits.topk(2).values
            gaps.append(float(top[0] - top[1]))
            tokens.append(int(logits.argmax()))
            logits = cache.step([tokens[-1]])[0]
    return tokens, min(gaps)


def sampled_alone(
    model: Any, prompt_ids: list[int], n: int, *, seed: int, temperature: float, end: set[int]
) -> tuple[list[int], float]:
    """A seeded job's tokens alone (top_p 1), and how close its closest draw came to a
    neighbouring token, in units of the margin that rounding within LOGIT_TOL can eat."""
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    closest = float("inf")
    with torch.inference_mode():
        cache = BatchCache(model, pad_token_id=0)
        logits = cache.add([prompt_ids])[0]
        while len(tokens) < n and (not tokens or tokens[-1] not in end):
            cdf = torch.softmax(logits.double() / temperature, -1).cumsum(-1)
            x = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cdf[-1])
            token = int(torch.searchsorted(cdf, torch.tensor([x], dtype=torch.float64), right=True))
            low = float(cdf[token - 1]) if token else 0.0
            # Logits within LOGIT_TOL move each cumulative probability, and the draw's point
            # among them, by at most 2 * LOGIT_TOL / temperature of its value.
            closest = min(closest, min(x - low, float(cdf[token]) - x) / (4 * LOGIT_TOL / temperature))
            tokens.append(token)
            logits = cache.step([token])[0]
    return tokens, closest


@pytest.mark.timeout(60)
def test_a_row_computes_its_logits_alone_up_to_rounding_whatever_joins_or_leaves(lm: tuple[Any, Any]) -> None:
    model, tokenizer = lm
    prompt = tokenizer("The morning was cold").input_ids
    tokens, _ = greedy_alone(model, prompt, 40)
    expected = alone(model, prompt, tokens)

    def in_a_changing_batch() -> torch.Tensor:
        # Given two companions that have generated a while, the job joins with a longer
        # prompt beside it; later the first companion leaves and another prompt joins
        with torch.inference_mode():
            cache = BatchCache(model, pad_token_id=0)
            logits = cache.add([tokenizer("Hello! " * k).input_ids for k in (1, 3)])
            for _ in range(5):
                logits = cache.step(logits.argmax(-1).tolist())
            joined = cache.add([prompt, tokenizer("A much longer companion prompt that runs on").input_ids])
            row, seen = 2, [joined[0]]
            feed = [*logits.argmax(-1).tolist(), tokens[0], int(joined[1].argmax())]
            for step, token in enumerate(tokens[1:], start=1):
                logits = cache.step(feed)
                seen.append(logits[row])
                feed = logits.argmax(-1).tolist()
                feed[row] = token
                if step == 10:
                    cache.keep([1, 2, 3])
                    row, feed = 1, feed[1:]
                if step == 20:
                    feed.append(int(cache.add([tokenizer("Late").input_ids])[0].argmax()))
        return torch.stack(seen)

    # When it is fed the same tokens in that batch
    batched = in_a_changing_batch()

    # Then at every step its logits are its logits alone, up to rounding
    drift = (batched - expected).abs().amax(-1)
    assert drift.max() <= LOGIT_TOL, f"logits moved by up to {drift.max():.2e} at step {int(drift.argmax())}"
    # and the same batch, run again, gives the same logits bit for bit
    assert torch.equal(in_a_changing_batch(), batched)


@pytest.mark.timeout(30)
def test_a_rows_draw_depends_only_on_its_logits_options_and_seed() -> None:
    # Given six rows of near-flat logits (as the random-weight model makes), greedy and
    # sampled, with and without a nucleus
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 0.3
    options = [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (1.0, 0.9), (0.0, 0.3)]

    def draws(rows: list[int], n: int = 30) -> dict[int, list[int]]:
        generators = {i: torch.Generator().manual_seed(100 + i) for i in rows}
        out: dict[int, list[int]] = {i: [] for i in rows}
        for _ in range(n):
            picked = sample(
                logits[rows],
                temperature=[options[i][0] for i in rows],
                top_p=[options[i][1] for i in rows],
                generators=[generators[i] for i in rows],
            )
            for i, token in zip(rows, picked, strict=True):
                out[i].append(token)
        return out

    # When they are sampled together, in another order, and each alone
    together, reversed_, each = draws(list(range(6))), draws(list(range(5, -1, -1))), {}
    for i in range(6):
        each.update(draws([i]))

    # Then every row drew the same tokens, bit for bit
    assert together == reversed_ == each
    assert together[0] == [int(logits[0].argmax())] * 30
    assert len(set(together[1])) > 20  # sampled rows really draw


@pytest.mark.timeout(30)
def test_the_nucleus_keeps_the_likeliest_tokens_and_every_token_tied_with_its_last() -> None:
    # Given probabilities 0.4, 0.2, 0.2, 0.1, 0.1 spread over the vocabulary
    probs = torch.zeros(1, 8)
    probs[0, [5, 1, 6, 3, 0]] = torch.tensor([0.4, 0.2, 0.2, 0.1, 0.1])
    logits = torch.where(probs > 0, probs.log(), torch.tensor(-1e9))
    generator = torch.Generator().manual_seed(1)

    def drawn(top_p: float) -> set[int]:
        return {sample(logits, temperature=[1.0], top_p=[top_p], generators=[generator])[0] for _ in range(400)}

    # Then a nucleus of 0.5 keeps 0.4 and both tokens of 0.2 (tied with the last it needs),
    # one of 0.95 all five, and the tiniest nucleus the likeliest token only
    assert drawn(0.5) == {5, 1, 6}
    assert drawn(0.95) == {5, 1, 6, 3, 0}
    assert drawn(0.01) == {5}
