"""Built-in tiny models: real diffusers pipelines with small seeded random weights.

They exist so that workers, tests and demos run end to end with no network and no
downloaded weights. Their images look like noise, but every code path (tokenizer, text
encoder, UNet, scheduler, VAE, image encoding) is the one a real Stable Diffusion takes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from blaze_jobs.errors import RequestError

#: Built-in model ids and the folder (under the model dir) each is built into.
BUILTIN_MODELS: dict[str, str] = {"builtin:tiny-sd": "tiny-sd"}

# CLIP's real context length: prompts are padded to it, so the text encoder sees the same
# shapes a full-size model would.
_CONTEXT_LENGTH = 77
_VOCAB_SIZE = 1000
# A few common English pairs, so the tokenizer exercises BPE merges rather than bytes only.
_MERGES = [
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>"),
    ("e", "r"), ("o", "n</w>"), ("o", "f</w>"), ("a", "t</w>"), ("e", "n"), ("o", "r</w>"),
]


def builtin_path(model: str, model_dir: Path) -> Path:
    """The folder holding the built-in ``model``, built there first if absent.

    Raises RequestError for an id that is not a built-in model.
    """
    try:
        folder = BUILTIN_MODELS[model]
    except KeyError:
        raise RequestError(f"unknown built-in model {model!r}; known: {sorted(BUILTIN_MODELS)}") from None
    target = Path(model_dir) / folder
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place: a rename is atomic on one filesystem,
    # so a process loading the model never sees half of it, even when two build at once.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; other users' workers read it too
        _build_tiny_sd().save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process won the race (the target now exists and is not empty).
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_tiny_sd() -> StableDiffusionPipeline:
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
    # Four blocks give the SD scale factor 2**(4-1) = 8.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
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
        )
    )
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


def _build_tokenizer() -> CLIPTokenizer:
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
