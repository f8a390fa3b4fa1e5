"""Built-in tiny models: real diffusers pipelines (Stable Diffusion, SDXL, SD 3) and a real
transformers causal language model, each with small seeded random weights.

They exist so that workers, tests and demos run end to end with no network and no
downloaded weights. Their images look like noise and their text is gibberish, but every code
path (tokenizer, text encoder, UNet, scheduler, VAE, image encoding; chat template, KV cache,
sampling, detokenizing) is the one a real Stable Diffusion or Llama takes.

Each engine's spec names its built-in models (``BuiltinModel``: id, folder, revision, and
the builder below); ``builtin_path`` builds one on first use. torch, diffusers and
transformers are imported inside the builders, so specs can name them from the API.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blaze_jobs.errors import RequestError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

# CLIP's real context length: prompts are padded to it, so the text encoder sees the same
# shapes a full-size model would.
_CONTEXT_LENGTH = 77
_VOCAB_SIZE = 1000
# A few common English pairs, so the tokenizer exercises BPE merges rather than bytes only.
# fmt: off
_MERGES = [
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>"),
    ("e", "r"), ("o", "n</w>"), ("o", "f</w>"), ("a", "t</w>"), ("e", "n"), ("o", "r</w>"),
]
# fmt: on


def builtin_path(model: str, model_dir: Path) -> Path:
    """The folder holding the built-in ``model``, built there first if absent.

    Raises RequestError for an id that is not a buildable built-in model of any engine.
    """
    import torch

    from blaze_jobs.engines import SPECS

    buildable = {b.id: b for spec in SPECS for b in spec.builtin_models if b.build is not None}
    builtin = buildable.get(model)
    if builtin is None or builtin.folder is None or builtin.marker is None or builtin.build is None:
        raise RequestError(f"unknown built-in model {model!r}; known: {sorted(buildable)}") from None
    target = Path(model_dir) / builtin.folder
    marker = target / builtin.marker
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place: a rename is atomic on one filesystem,
    # so a process loading the model never sees half of it, even when two build at once.
    staging = Path(tempfile.mkdtemp(prefix=f".{builtin.folder}-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; other users' workers read it too
        # Seeding must not disturb the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            parts = builtin.build()
        for part in parts:  # a pipeline, or a model and its tokenizer
            part.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process won the race (the target now exists and is not empty).
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_sd() -> tuple[Any, ...]:
    """``builtin:tiny-sd``: a Stable Diffusion pipeline that makes 64x64 images."""
    return (_build_tiny_sd(),)


def tiny_sdxl() -> tuple[Any, ...]:
    """``builtin:tiny-sdxl``: a Stable Diffusion XL pipeline (two text encoders, the second's
    pooled output and the size conditioning in the UNet) that makes 64x64 images."""
    return (_build_tiny_sdxl(),)


def tiny_sd3() -> tuple[Any, ...]:
    """``builtin:tiny-sd3``: a Stable Diffusion 3 pipeline (a joint-attention transformer,
    flow matching, two CLIP encoders; no T5, as SD 3 runs without it) making 64x64 images."""
    return (_build_tiny_sd3(),)


def tiny_lm() -> tuple[Any, ...]:
    """``builtin:tiny-lm``: a Llama causal LM and its chat tokenizer."""
    return _build_tiny_lm()


def _build_tiny_sd() -> StableDiffusionPipeline:
    # Imported here: importing diffusers takes seconds, which a text worker need not wait.
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    # Each component is seeded on its own, so the weights do not depend on build order.
    torch.manual_seed(0)
    # Latents are 8x8 and the VAE upsamples 8 times: the default image is 64x64 pixels.
    # The shape of diffusers' own test UNet; 20 steps at 64x64 take about 0.6 s on 2 CPU cores.
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(0)
    vae = _tiny_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    # The scheduler Stable Diffusion 1.5 ships with.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _clip_config(**extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=_VOCAB_SIZE,
        max_position_embeddings=_CONTEXT_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=32,
        **extra,
    )


def _tiny_vae(**extra: Any) -> Any:
    from diffusers import AutoencoderKL

    # Four blocks give the SD scale factor 2**(4-1) = 8: 8x8 latents are 64x64 pixels.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        **extra,
    )


def _build_tiny_sdxl() -> Any:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    # The UNet of diffusers' own SDXL tests: its added embedding reads the second encoder's
    # pooled 32 values and six size ids of 8 each (32 + 48 = 80); it attends to both
    # encoders' hidden states side by side (32 + 32 = 64).
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    torch.manual_seed(0)
    vae = _tiny_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    # The scheduler SDXL 1.0 ships with.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_build_tokenizer(),
        tokenizer_2=_build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def _build_tiny_sd3() -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    # Joint attention over the image's 64 patches and the prompt's tokens: the two CLIP
    # encoders' hidden states side by side (32 + 32 = 64 wide), their pooled outputs joined
    # (32 + 32 = 64); 4 heads of 8 make the transformer 32 wide.
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(0)
    vae = _tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    # SD 3's own scheduler (its shift of 3.0 among them).
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_build_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_build_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _build_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    # CLIP's byte-level BPE: every byte maps to a printable character, and a token that ends
    # a word carries "</w>". Bytes alone (plus merges) cover any prompt, so nothing is unknown.
    alphabet = _byte_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    tokens += [a + b for a, b in _MERGES]
    assert len(tokens) <= _VOCAB_SIZE
    # Written as the vocab.json and merges.txt files CLIP ships, and read back through
    # from_pretrained, which both transformers 4 and 5 accept.
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in _MERGES)
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=_CONTEXT_LENGTH)


def _byte_alphabet() -> list[str]:
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest are shifted
    # past 255 so that no byte maps to whitespace or a control character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shift))
            shift += 1
    return chars


# --- builtin:tiny-lm ----------------------------------------------------------------------

# A Llama of 4 layers x 256 wide: the shape of the smallest test models, big enough that
# batching pays on a CPU as it does for real models on a GPU (the per-step cost is mostly
# fixed), small enough to build in a second and run hundreds of tokens a second.
_LM_LAYERS, _LM_WIDTH, _LM_HEADS, _LM_FFN = 4, 256, 4, 688
_LM_CONTEXT = 2048
_LM_VOCAB = 1024  # at most: the text above yields about 900 tokens
_LM_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, the template many real chat models ship: each turn is wrapped in <|im_start|>role
# ... <|im_end|>, and the model answers after "<|im_start|>assistant\n".
_LM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# What the tokenizer learns its merges from: plain English, so common words and word pieces
# become single tokens (" the", "ing", " morning") as they do in a real tokenizer.
_LM_TEXT = """\
The morning was cold and clear, and the river ran fast under the old stone bridge.
A small boat with a red sail moved slowly past the houses on the other side of the water.
She opened the window, looked at the sky, and decided that it was a good day for a long walk.
People in the town said that the baker woke up before the birds and went to bed after the moon.
When the train arrived at the station, everyone on the platform stepped back from the edge.
The teacher asked the class to write a short story about a place they would like to visit.
It is often easier to start a new project than to finish an old one, but finishing is what counts.
The library kept its oldest books in a room with thick walls, low light and a single wooden table.
If you want to learn how a machine works, take it apart carefully and put it back together again.
The weather changed in the afternoon: dark clouds came from the west, and the wind grew stronger.
A good question is worth more than a quick answer, because it shows you where to look next.
The market opened at nine, and by ten the streets were full of voices, colours and the smell of fruit.
The lighthouse stood at the end of the rocky point, and its light turned all night long.
Writing clear instructions is hard: you must imagine a reader who knows nothing of what you know.
A queue is a line of things that wait their turn, and the first to arrive is the first to leave.
Workers take jobs from the queue, do the work, and report the results to anyone who asks.
When there is too much work for one worker, you can start another, and the line moves faster.
He read the letter twice, folded it, and put it in the pocket of his coat without a word.
In the winter the lake froze, and families came to skate on the ice under the bright blue sky.
Good tools make good work easier, but they cannot replace care, patience and practice.
We planned to leave at six, but the car would not start, so we took the bus instead.
What do you think will happen next? Nobody knows, and that is what makes the future interesting.
Please answer the question in one sentence, and then explain your answer in a few more.
The numbers one, two, three, four, five, six, seven, eight, nine and ten are easy to learn.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday make up the week.
A user asked the assistant for a poem about the sea, and the assistant wrote four short lines.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
"""


def _build_tiny_lm() -> tuple[Any, Any]:
    """A Llama causal LM with seeded random weights and its tokenizer, with a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # 1. A byte-level BPE (GPT-2's scheme: any text encodes, nothing is unknown) trained on
    #    the text above. Training is deterministic, so every build gives the same tokens.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_LM_VOCAB,
        special_tokens=_LM_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_LM_TEXT.splitlines(), trainer=trainer)
    eos, _, end_of_turn = (_special_id(bpe, t) for t in _LM_SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=_LM_CHAT_TEMPLATE,
        model_max_length=_LM_CONTEXT,
    )

    # 2. The model, seeded, sized to the tokenizer. A chat turn ends at <|im_end|>, a plain
    #    text at <|endoftext|>: both end generation.
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_LM_WIDTH,
        intermediate_size=_LM_FFN,
        num_hidden_layers=_LM_LAYERS,
        num_attention_heads=_LM_HEADS,
        num_key_value_heads=_LM_HEADS,
        max_position_embeddings=_LM_CONTEXT,
        bos_token_id=eos,
        eos_token_id=[eos, end_of_turn],
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=[eos, end_of_turn], pad_token_id=eos)
    return model, tokenizer


def _special_id(bpe: Any, token: str) -> int:
    found = bpe.token_to_id(token)
    if found is None:  # the trainer adds every special token: only a change to it gets here
        raise ValueError(f"the built-in tokenizer has no {token!r}")
    return found
