"""Text generation with transformers causal language models, continuously batched.

Each loaded model gets a ``TextGenerator`` (``blaze_jobs/textgen.py``): jobs join its running
generation at the next token and leave it when they finish, up to ``max_batch`` at once. So
the engine batches ``continuous``ly: the batcher hands it each job through ``submit`` as the
job arrives, instead of grouping jobs into static batches for ``run_batch``. torch and
transformers are imported only where the engine runs, so the API reads the spec without them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from blaze_jobs import builtin_models
from blaze_jobs.engines.base import Engine, EngineRequest, OutputFuture, read_int, read_seed, request_territory
from blaze_jobs.engines.spec import Batching, Bound, BuiltinModel, CommaList, EngineSpec, JSONInt, OptionalJSONInt, OutOfBounds
from blaze_jobs.errors import BlazeError, RequestError, WorkerFault

if TYPE_CHECKING:
    from blaze_jobs.settings import Settings
    from blaze_jobs.textgen import TextGenerator, TextRequest

logger = logging.getLogger(__name__)

#: Tokens a job generates when its input names no ``max_new_tokens`` (the API's default too).
DEFAULT_MAX_NEW_TOKENS = 128


class ChatMessage(BaseModel):
    """One turn of a chat."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="What they say.")


class LLMInput(BaseModel):
    """Input of a text job: a `prompt` to continue, or chat `messages` to answer (exactly one).
    Bounds beyond the ones shown are deployment settings (``BLAZE_LLM_MAX_NEW_TOKENS``,
    ``BLAZE_LLM_MAX_PROMPT_CHARS``, ``BLAZE_LLM_MAX_MESSAGES``, ``BLAZE_LLM_MAX_STOP`` …)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        # The schema says what the validator below checks: a prompt or messages, not both.
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        },
    )

    prompt: str | None = Field(None, min_length=1, description="Text for the model to continue.")
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        description="A chat, rendered with the model's chat template; the model writes the assistant's next turn.",
    )
    max_new_tokens: JSONInt = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, description="Most tokens to generate.")
    temperature: float = Field(
        1.0, ge=0, le=2, description="Sampling temperature; 0 takes the likeliest token every time (greedy)."
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: draw from the likeliest tokens whose probabilities add up to this."
    )
    seed: OptionalJSONInt = Field(
        None,
        ge=0,
        le=2**32 - 1,
        description="Random seed for sampling. The same seed and input give the same text alone (and the cached "
        "text on a repeat); beside other jobs, the same text except where a draw falls within the rounding of "
        "batched kernels of another token. Drawn at random (and reported in the output) when absent.",
    )
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="Generation ends where the first of these strings appears; it is not part of the text."
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> LLMInput:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class LLMSettings(BaseModel):
    #: The text model: ``builtin:tiny-lm``, a Hugging Face id or a local path.
    llm_model: str = "builtin:tiny-lm"
    #: Text models a request may name besides ``llm_model`` (comma-separated), refused
    #: otherwise, as for diffusion.
    llm_models: CommaList = Field(default_factory=list)
    # Bounds on text input. 1,024 new tokens is a long answer and keeps one job from holding
    # a batch slot for minutes; the prompt is bounded in characters here, and in tokens by
    # the worker against the model's context length.
    llm_max_new_tokens: int = 1_024
    llm_max_prompt_chars: int = 16_000
    #: Turns in one chat.
    llm_max_messages: int = 64
    #: Stop strings per job (four, as OpenAI's API allows), and characters in each.
    llm_max_stop: int = 4
    llm_max_stop_chars: int = 64


def _check(text: LLMInput, settings: Settings, model: str) -> None:
    # The schema bounds each message (ChatMessage.content); the prompt is bounded as a whole.
    chars = sum(len(m.content) for m in text.messages or [])
    if chars > settings.llm_max_prompt_chars:
        raise OutOfBounds("input.messages", f"{chars} exceeds the limit of {settings.llm_max_prompt_chars} characters")


def _cacheable(input: dict[str, Any]) -> bool:
    # Greedy text (temperature 0) samples nothing, so it is as deterministic as a seeded one.
    return input.get("seed") is not None or input.get("temperature", 1.0) == 0


def _create(settings: Settings, *, device: str | None = None, max_batch: int | None = None) -> LLMEngine:
    # A continuous engine bounds the sequences it runs at once itself.
    return LLMEngine(
        model_dir=settings.model_dir,
        device=device or settings.device,
        max_batch=max_batch or settings.max_batch,
        max_loaded_models=settings.max_loaded_models,
    )


SPEC = EngineSpec(
    name="llm",
    input_model=LLMInput,
    description="A text job, run by a transformers causal language model. The output is `{text, "
    "finish_reason, usage: {prompt_tokens, completion_tokens}}`, with `seed` when sampling; "
    "`finish_reason` is `stop` (end of sequence or a stop string), `length` or `canceled`.",
    batching=Batching.continuous,
    create=_create,
    settings=LLMSettings,
    default_model_setting="llm_model",
    allowed_models_setting="llm_models",
    bounds=(
        Bound(LLMInput, "max_new_tokens", "llm_max_new_tokens", "tokens"),
        Bound(LLMInput, "prompt", "llm_max_prompt_chars", "characters"),
        Bound(LLMInput, "messages", "llm_max_messages", "messages"),
        Bound(LLMInput, "stop", "llm_max_stop", "strings"),
        # What the schema cannot say exactly (the characters of all messages together), it
        # says of each part, which the whole bounds anyway (``_check`` bounds the whole).
        Bound(ChatMessage, "content", "llm_max_prompt_chars", "characters"),
        Bound(LLMInput, "stop", "llm_max_stop_chars", "characters in a stop string", items=True),
    ),
    check=_check,
    cacheable=_cacheable,
    builtin_models=(
        BuiltinModel(id="builtin:tiny-lm", revision="1", folder="tiny-lm", marker="config.json", build=builtin_models.tiny_lm),
    ),
)


class LLMEngine(Engine):
    """Runs text jobs on causal language models, keeping the last few models loaded."""

    #: Jobs go to ``submit`` one by one and join the running generation at a token boundary.
    spec = SPEC

    def __init__(self, *, model_dir: Path, device: str = "cpu", max_batch: int = 8, max_loaded_models: int = 2) -> None:
        import torch

        self.model_dir = Path(model_dir)
        self.device = device
        self.max_batch = max(1, max_batch)
        self.max_loaded_models = max(1, max_loaded_models)
        if device.startswith("cuda"):
            self._dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self._dtype = torch.float32
        self._generators: OrderedDict[str, TextGenerator] = OrderedDict()
        # Held while a job is tokenized and queued (tokenizers are not safe across threads)
        # and while a model loads.
        self._lock = threading.Lock()
        # What is loaded, for readers that must not wait for a load (the heartbeat: a load
        # can take longer than a lease): replaced, never changed, under the lock.
        self._loaded: tuple[str, ...] = ()
        # Models loaded together take turns on the device, one step at a time.
        self._device_lock = threading.Lock()

    def loaded_models(self) -> list[str]:
        """The models now in memory, least recently used first (never waits for a load)."""
        return list(self._loaded)

    def batch_key(self, request: EngineRequest) -> tuple:
        return (request.model,)

    def submit(self, request: EngineRequest) -> OutputFuture:
        """Queue ``request`` to join its model's running generation.

        The future resolves to ``{"text", "finish_reason", "usage", ["seed"]}`` (a canceled
        job too, with the text so far and ``finish_reason`` "canceled"), or to the job's
        RequestError or WorkerFault. Its ``batch_size`` attribute is the most jobs the job
        shared the device with.
        """
        try:
            with self._lock:
                generator = self._generator(request.model)
                # Tokenizing and checking the input is the request's territory (engines.base).
                with request_territory(f"input for {request.model!r}"):
                    text_request = _resolve(request, generator)
                return generator.submit(text_request)
        except BlazeError as error:
            future = OutputFuture()
            future.set_exception(error)
            return future

    def run_batch(self, requests: list[EngineRequest]) -> list[dict[str, Any] | BaseException]:
        """Run ``requests`` together: all join the generation at once, each leaves when done."""
        futures = [self.submit(request) for request in requests]
        return [future.exception() or future.result() for future in futures]

    def prepare(self, model: str) -> None:
        """Load (for a built-in model, build) ``model`` and run two tokens through it, so the
        first job finds the worker warm."""
        self.run(EngineRequest(job_id="warm-up", model=model, input={"prompt": "Hello", "max_new_tokens": 2, "temperature": 0}))

    def close(self) -> None:
        """Stop every generator (jobs still running fail as worker faults) and free the models."""
        with self._lock:
            generators, self._generators = list(self._generators.values()), OrderedDict()
            self._loaded = ()
        for generator in generators:
            generator.close()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # --- loading ------------------------------------------------------------------------

    def _generator(self, model: str) -> TextGenerator:
        try:
            return self._find_or_load(model)
        finally:
            self._loaded = tuple(self._generators)

    def _find_or_load(self, model: str) -> TextGenerator:
        generator = self._generators.get(model)
        if generator is not None:
            self._generators.move_to_end(model)
            return generator
        # Make room first, evicting only idle models: a busy one keeps its jobs.
        while len(self._generators) >= self.max_loaded_models:
            idle = next((name for name, g in self._generators.items() if not g.busy()), None)
            if idle is None:
                break
            self._generators.pop(idle).close()
            logger.info("evicted text model %s", idle)
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
        self._loaded = tuple(self._generators)
        generator = self._load(model)
        self._generators[model] = generator
        return generator

    def _load(self, model: str) -> TextGenerator:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from blaze_jobs.textgen import TextGenerator

        try:
            path: str | Path = builtin_models.builtin_path(model, self.model_dir) if model.startswith("builtin:") else model
            tokenizer = AutoTokenizer.from_pretrained(path)
            # Cast after loading, as the diffusion engine does: from_pretrained's dtype
            # keyword changed names across versions.
            # transformers declares PreTrainedModel.to with functools.wraps(torch.nn.Module.to),
            # whose type mypy reads as the unbound Module.to (self first).
            lm = AutoModelForCausalLM.from_pretrained(path).to(self.device, self._dtype).eval()  # type: ignore[arg-type]
        except BlazeError:
            raise
        except Exception as exc:  # the model was configured here: a failure is this worker's
            raise WorkerFault(f"could not load text model {model!r} on {self.device}: {exc}") from exc
        eos = lm.generation_config.eos_token_id if lm.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        generator = TextGenerator(lm, tokenizer, max_batch=self.max_batch, eos_token_ids=eos_ids, device_lock=self._device_lock)
        try:
            generator.check_cache_layout()
        except BaseException:
            generator.close()
            raise
        logger.info("loaded text model %s on %s", model, self.device)
        return generator


def _resolve(request: EngineRequest, generator: TextGenerator) -> TextRequest:
    """The request's prompt as token ids and every option with its default.

    The API validated the input already; these checks guard direct callers and name the
    field of anything a model cannot take (a prompt beyond its context, no chat template).
    """
    data, tokenizer = request.input, generator.tokenizer
    prompt, messages = data.get("prompt"), data.get("messages")
    # 1. The prompt's tokens: a plain prompt as it is, a chat through the model's template.
    if (prompt is None) == (messages is None):
        raise RequestError("input: give exactly one of prompt or messages")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt: must be a non-empty string")
        ids = tokenizer(prompt).input_ids
    else:
        if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
            raise RequestError("messages: must be a non-empty list of {role, content} strings")
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(f"messages: model {request.model!r} has no chat template; send a prompt instead")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template may refuse, e.g. roles that do not alternate
            raise RequestError(f"messages: the chat template of {request.model!r} refused them: {exc}") from exc
        # The template writes any special tokens (a BOS) itself.
        ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise RequestError("prompt: encodes to no tokens")
    if len(ids) >= generator.context_length:
        raise RequestError(
            f"prompt: {len(ids)} tokens leave no room to generate in {request.model!r}, "
            f"which reads at most {generator.context_length}"
        )

    # 2. The options.
    temperature, top_p = _number(data, "temperature", 1.0), _number(data, "top_p", 1.0)
    if temperature < 0 or not 0 < top_p <= 1:
        raise RequestError("temperature must be at least 0, and top_p in (0, 1]")
    stop = data.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop: must be a list of non-empty strings")
    from blaze_jobs.textgen import TextRequest

    return TextRequest(
        prompt_ids=list(ids),
        max_new_tokens=read_int(data, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS, minimum=1),
        temperature=temperature,
        top_p=top_p,
        seed=read_seed(data),
        stop=tuple(stop),
        should_stop=request.should_stop,
        on_delta=getattr(request, "on_delta", None),
        on_partial=getattr(request, "on_partial", None),
        on_progress=request.on_progress,
    )


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)


def _number(data: dict[str, Any], field: str, default: float) -> float:
    value = data.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{field}: must be a number, got {value!r}")
    return float(value)
