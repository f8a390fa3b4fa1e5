"""Continuous batching for causal language models: sequences join a running generation at
token boundaries and leave it as soon as they finish.

One ``TextGenerator`` per loaded model runs a loop on a thread of its own. Each turn:

1. Admit waiting sequences while the batch has room (``max_batch``) and prefill them
   together: each gets its first token from its own prompt, and joins the batch's cache
   (``blaze_jobs/kvcache.py``: how rows of different lengths share one cache).
2. Run one decoding step for every sequence in the batch: one model call, one token each.
3. Sample each sequence's token with its own temperature, top-p and random generator;
   detokenize, look for stop strings and end-of-sequence, stream the new text.
4. Drop finished sequences from the batch.

Callbacks (streamed text, progress, the futures) and cancel polls run on a second thread,
the relay, so a slow callback or a Redis round trip never holds up the device.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from blaze_jobs.engines.base import OutputFuture
from blaze_jobs.errors import WorkerFault
from blaze_jobs.kvcache import BatchCache, UnsupportedCache

log = logging.getLogger("blaze_jobs.textgen")

#: How often the relay asks each sequence's ``should_stop`` (a Redis read per job in a
#: worker): a canceled job stops within this long plus one token.
CANCEL_POLL_S = 0.1
#: The longest UTF-8 character; a token carries at least one byte of it.
_MAX_CHARACTER_BYTES = 4


def _never() -> bool:
    return False


@dataclass
class TextRequest:
    """One generation as the loop runs it: the prompt's token ids and every option resolved."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0  # 0 is greedy: the likeliest token every time
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    should_stop: Callable[[], bool] = _never
    on_delta: Callable[[str], None] | None = None  # each new piece of text, in order
    # Just before each piece of text: the output so far but its text and finish reason
    # (usage, seed), so a cancel can end the job with what it streamed (worker, store).
    on_partial: Callable[[dict[str, Any]], None] | None = None
    on_progress: Callable[[int, int], None] | None = None  # (tokens so far, max_new_tokens)


@dataclass(eq=False)
class _Sequence:
    request: TextRequest
    future: OutputFuture
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # generated, end-of-sequence included
    text: str = ""  # the output text so far (stop strings cut off)
    emitted: int = 0  # characters of ``text`` already streamed
    next_token: int = 0  # sampled, not yet fed to the model
    finish_reason: str | None = None
    canceled: bool = False  # set by the relay thread
    peak_batch: int = 0  # most sequences it shared the device with, itself included
    # Incremental detokenizing: text is released only when the bytes so far form whole
    # characters, by decoding a window of the last tokens (the scheme of TGI and vLLM).
    decoded: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0


class TextGenerator:
    """Runs many generations of one model at once, joining and leaving at token boundaries."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int,
        eos_token_ids: set[int],
        device_lock: threading.Lock | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.max_batch = max(1, max_batch)
        self.eos_token_ids = set(eos_token_ids)
        self.context_length: int = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids, default=0)
        self.steps = 0  # decoding steps run, for tests and benchmarks
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = backend.decode if backend is not None else tokenizer.decode
        self._device_lock = device_lock or threading.Lock()
        # The batch: its sequences, in the order of their rows in the cache.
        self._rows: list[_Sequence] = []
        self._batch = BatchCache(model, pad_token_id=self.pad_token_id)
        self._waiting: deque[_Sequence] = deque()
        self._live: set[_Sequence] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._outbox: queue.SimpleQueue[list[tuple[Callable[..., Any], tuple]] | None] = queue.SimpleQueue()
        self._loop_thread = threading.Thread(target=self._loop, name="blaze-textgen", daemon=True)
        self._relay_thread = threading.Thread(target=self._relay, name="blaze-textgen-relay", daemon=True)
        self._loop_thread.start()
        self._relay_thread.start()

    # --- what callers use ---------------------------------------------------------------

    def submit(self, request: TextRequest) -> OutputFuture:
        """Queue a generation; the future resolves to its output dict, or to its error.

        The future's ``batch_size`` attribute tells, once it resolves, the most sequences
        that shared the device with this one.
        """
        future = OutputFuture()
        sequence = _Sequence(request, future, torch.Generator().manual_seed(request.seed))
        with self._cond:
            if self._closed:
                future.set_exception(WorkerFault("the text generator is closed"))
                return future
            self._waiting.append(sequence)
            self._live.add(sequence)
            self._cond.notify()
        return future

    def busy(self) -> bool:
        """Whether any sequence waits or runs."""
        with self._cond:
            return bool(self._live)

    def check_cache_layout(self) -> None:
        """Raise WorkerFault unless this model's cache is one the loop knows how to batch."""
        try:
            self._batch.check()
        except UnsupportedCache as error:
            raise WorkerFault(f"the llm engine cannot batch this model: {error}") from error

    def close(self) -> None:
        """Stop the loop; sequences still waiting or running fail with WorkerFault."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._loop_thread.join(timeout=30)
        self._relay_thread.join(timeout=30)

    # --- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while (joiners := self._admit()) is not None:
                with self._device_lock:
                    try:
                        if joiners:
                            self._join(joiners)
                        if self._rows:
                            self._step()
                    except Exception as exc:  # outside a model call (a cache copy, a bug): the batch fails, the loop goes on
                        log.exception("text generation failed")
                        with self._cond:
                            stuck = [s for s in dict.fromkeys([*self._rows, *joiners]) if s in self._live]
                        self._rows = []
                        self._batch.clear()
                        self._settle([(s, self._fault(exc, len(stuck))) for s in stuck])
        error = WorkerFault("the worker is shutting down")
        with self._cond:
            left = [*self._rows, *self._waiting]
            self._rows, self._waiting = [], deque()
        self._batch.clear()
        self._settle([(s, error) for s in left])
        self._outbox.put(None)

    def _admit(self) -> list[_Sequence] | None:
        """Waiting sequences that fit in the batch; blocks while there is nothing to do."""
        with self._cond:
            while not self._closed and not self._waiting and not self._rows:
                self._cond.wait()
            if self._closed:
                return None
            room = self.max_batch - len(self._rows)
            joiners = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        # Canceled while waiting: they end with no text, never touching the device.
        canceled = [s for s in joiners if s.canceled]
        for s in canceled:
            s.finish_reason = "canceled"
        self._finish(canceled)
        return [s for s in joiners if not s.canceled]

    def _join(self, joiners: list[_Sequence]) -> None:
        try:
            logits = self._batch.add([s.request.prompt_ids for s in joiners])
        except Exception as exc:  # the running batch is untouched; only the joiners fail
            self._settle([(s, self._fault(exc, len(joiners))) for s in joiners])
            return
        self._rows.extend(joiners)
        self._advance(joiners, logits, first_row=len(self._rows) - len(joiners))

    def _step(self) -> None:
        rows = self._rows
        try:
            logits = self._batch.step([s.next_token for s in rows])
        except Exception as exc:  # the batch's cache is in an unknown state: all of it fails
            error = self._fault(exc, len(rows))
            self._rows = []
            self._batch.clear()
            self._settle([(s, error) for s in rows])
            return
        self.steps += 1
        self._advance(rows, logits, first_row=0)

    def _fault(self, exc: Exception, rows: int) -> WorkerFault:
        fault = WorkerFault(f"text generation of {rows} sequence(s) failed on {self.device}: {exc!r}")
        fault.__cause__ = exc
        exc.__traceback__ = None  # drop the failed call's tensors with its frames
        return fault

    # --- tokens to text -----------------------------------------------------------------

    def _advance(self, rows: list[_Sequence], logits: torch.Tensor, *, first_row: int) -> None:
        """Give each of ``rows`` (the batch's rows from ``first_row`` on) its sampled token;
        stream text; drop the rows that finished."""
        tokens = _sample(logits, rows)
        calls: list[tuple[Callable[..., Any], tuple]] = []
        for row, (s, token) in enumerate(zip(rows, tokens, strict=True), start=first_row):
            s.peak_batch = max(s.peak_batch, len(self._rows))
            s.tokens.append(token)
            s.next_token = token
            request = s.request
            if token in self.eos_token_ids:
                s.finish_reason = "stop"
                self._append(s, self._rest_of_text(s))
            elif self._append(s, self._next_text(s, token)):
                s.finish_reason = "stop"
            elif s.canceled or len(s.tokens) >= request.max_new_tokens or self._batch.lengths[row] >= self.context_length:
                s.finish_reason = "canceled" if s.canceled else "length"
                if self._append(s, self._rest_of_text(s)):
                    s.finish_reason = "stop"
            end = len(s.text) if s.finish_reason else len(s.text) - _held_back(s.text, request.stop)
            if request.on_delta is not None and end > s.emitted:
                if request.on_partial is not None:
                    calls.append((request.on_partial, (self._partial(s),)))
                calls.append((request.on_delta, (s.text[s.emitted : end],)))
            s.emitted = max(s.emitted, end)
            if request.on_progress is not None:
                calls.append((request.on_progress, (len(s.tokens), request.max_new_tokens)))
        if calls:
            self._outbox.put(calls)
        finished = [s for s in rows if s.finish_reason is not None]
        if finished:
            self._finish(finished)
            keep = [i for i, s in enumerate(self._rows) if s.finish_reason is None]
            self._batch.keep(keep)
            self._rows = [self._rows[i] for i in keep]

    def _next_text(self, s: _Sequence, token: int) -> str:
        s.decoded.append(token)
        before = self._decode(s.decoded[s.prefix_offset : s.read_offset], skip_special_tokens=True)
        after = self._decode(s.decoded[s.prefix_offset :], skip_special_tokens=True)
        # A trailing U+FFFD is a character whose bytes have not all come yet, unless it has
        # waited longer than any character takes (4 bytes): then the bytes are invalid, and
        # go out as they decode, so a model making garbage still streams.
        settled = not after.endswith("\ufffd") or len(s.decoded) - s.read_offset > _MAX_CHARACTER_BYTES
        if len(after) > len(before) and settled:
            s.prefix_offset, s.read_offset = s.read_offset, len(s.decoded)
            return after[len(before) :]
        return ""

    def _rest_of_text(self, s: _Sequence) -> str:
        # At the end, bytes that never formed a whole character are released as they are.
        before = self._decode(s.decoded[s.prefix_offset : s.read_offset], skip_special_tokens=True)
        after = self._decode(s.decoded[s.prefix_offset :], skip_special_tokens=True)
        s.prefix_offset = s.read_offset = len(s.decoded)
        return after[len(before) :] if len(after) > len(before) else ""

    @staticmethod
    def _append(s: _Sequence, piece: str) -> bool:
        """Add ``piece`` to the text; True when that completes a stop string (cut off here)."""
        if not piece:
            return False
        start = len(s.text)
        s.text += piece
        stops = s.request.stop
        if not stops:
            return False
        longest = max(map(len, stops))
        window = max(0, start - longest + 1)
        found = [i for i in (s.text.find(stop, window) for stop in stops) if i >= 0]
        if not found:
            return False
        s.text = s.text[: min(found)]
        return True

    # --- ending --------------------------------------------------------------------------

    def _finish(self, sequences: list[_Sequence]) -> None:
        outcomes: list[tuple[_Sequence, dict[str, Any] | BaseException]] = []
        for s in sequences:
            outcomes.append((s, {"text": s.text, "finish_reason": s.finish_reason, **self._partial(s)}))
        self._settle(outcomes)

    @staticmethod
    def _partial(s: _Sequence) -> dict[str, Any]:
        """The output's fields but text and finish reason, as they stand."""
        fields: dict[str, Any] = {"usage": {"prompt_tokens": len(s.request.prompt_ids), "completion_tokens": len(s.tokens)}}
        if s.request.temperature > 0:
            fields["seed"] = s.request.seed
        return fields

    def _settle(self, outcomes: list[tuple[_Sequence, dict[str, Any] | BaseException]]) -> None:
        """Resolve futures on the relay thread, after every delta queued before them."""
        if not outcomes:
            return
        calls: list[tuple[Callable[..., Any], tuple]] = []
        with self._cond:
            for s, outcome in outcomes:
                self._live.discard(s)
                s.future.batch_size = max(1, s.peak_batch)
                if isinstance(outcome, BaseException):
                    calls.append((s.future.set_exception, (outcome,)))
                else:
                    calls.append((s.future.set_result, (outcome,)))
        self._outbox.put(calls)

    # --- the relay thread ---------------------------------------------------------------

    def _relay(self) -> None:
        next_poll = 0.0
        while True:
            try:
                calls = self._outbox.get(timeout=CANCEL_POLL_S)
            except queue.Empty:
                calls = []
            if calls is None:
                return
            for fn, args in calls:
                try:
                    fn(*args)
                except Exception:  # a hook's failure must not end the generation
                    log.exception("text generation callback %r failed", fn)
            if time.monotonic() >= next_poll:
                self._poll_cancels()
                next_poll = time.monotonic() + CANCEL_POLL_S

    def _poll_cancels(self) -> None:
        with self._cond:
            live = [s for s in self._live if not s.canceled]
        for s in live:
            try:
                s.canceled = bool(s.request.should_stop())
            except Exception as exc:  # e.g. Redis away: keep generating, ask again later
                log.warning("could not ask whether a text job was canceled: %s", exc)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` might begin a stop string, so must not be streamed yet."""
    for k in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(stop.startswith(tail) for stop in stops):
            return k
    return 0


def _sample(logits: torch.Tensor, rows: list[_Sequence]) -> list[int]:
    return sample(
        logits,
        temperature=[s.request.temperature for s in rows],
        top_p=[s.request.top_p for s in rows],
        generators=[s.generator for s in rows],
    )


def sample(logits: torch.Tensor, *, temperature: list[float], top_p: list[float], generators: list[torch.Generator]) -> list[int]:
    """Each row's next token: greedy at temperature 0, else drawn from its own generator.

    A row's draw uses only its own logits, options and generator, one uniform number per
    token, so for given logits its token does not depend on which rows share the batch.
    The draw inverts the cumulative probabilities in vocabulary order, the nucleus only
    zeroing tokens less likely than its least likely one: in sorted order, rounding could
    swap two tokens of equal probability and so change the draw (docs/workers.md).
    """
    chosen = logits.argmax(-1)
    sampled = [i for i, t in enumerate(temperature) if t > 0]
    if sampled:
        device = logits.device
        index = torch.tensor(sampled, device=device)
        temperatures = torch.tensor([temperature[i] for i in sampled], device=device)
        probs = torch.softmax(logits[index] / temperatures[:, None], dim=-1)
        if any(top_p[i] < 1.0 for i in sampled):
            nucleus = torch.tensor([top_p[i] for i in sampled], device=device)[:, None]
            # Keep the likeliest tokens until their mass reaches top_p (the first always).
            ranked = probs.sort(dim=-1, descending=True).values
            kept = ((ranked.cumsum(-1) - ranked) < nucleus).sum(-1, keepdim=True)
            least = torch.where(nucleus < 1.0, ranked.gather(-1, kept - 1), 0.0)
            probs = probs.masked_fill(probs < least, 0.0)
        cdf = probs.cumsum(-1)
        # Uniform draws come from each row's CPU generator, so a seed means the same on any device.
        u = torch.stack([torch.rand((), generator=generators[i], dtype=torch.float64) for i in sampled])
        total = cdf[:, -1]
        # Below the total, so the draw never lands past the last token that has any mass.
        u = torch.minimum(u.to(device=device, dtype=cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
        pick = torch.searchsorted(cdf, u[:, None].contiguous(), right=True).clamp_(max=cdf.shape[-1] - 1)
        chosen[index] = pick.squeeze(-1)
    return chosen.tolist()
