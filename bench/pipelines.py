"""The diffusion pipeline ``bench/batching.py`` measures the system against: one of the
Stable Diffusion 1.5 architecture with random weights (built with no download: the GPU
machine has no network), loaded as the diffusion engine loads it, and the raw baselines
timed in this process, the bare pipeline call and ``DiffusionEngine.run_batch``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

# The GPU machine has no network: never ask the Hugging Face hub for anything. Set here,
# before this module (or its importer) loads diffusers or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

#: Every image's prompt, in the raw calls and the system's jobs alike: image i's ends ", study i".
PROMPT = "a lighthouse at dusk, oil on canvas"
#: Folder (under the model dir) of the random-weight SD 1.5 pipeline; bump when the builder changes.
SD15_FOLDER = "sd15-random-v1"


def build_sd15(model_dir: Path, *, device: str) -> Path:
    """A Stable Diffusion 1.5-shaped pipeline with random weights, saved under ``model_dir``.

    The UNet, VAE and text encoder take SD 1.5's published config values; the tokenizer and
    the scheduler are the built-in tiny-sd's (CLIP-style BPE, SD 1.5's PNDM settings), so
    nothing is downloaded. Weights are stored in fp16 (about 2 GB).
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from blaze_jobs.builtin_models import builtin_path

    target = model_dir / SD15_FOLDER
    if (target / "model_index.json").exists():
        return target
    started = time.perf_counter()
    tiny = builtin_path("builtin:tiny-sd", model_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer")
    scheduler = PNDMScheduler.from_pretrained(tiny, subfolder="scheduler")
    # Build on the GPU when there is one: initialising ~1.1 B parameters is much faster there.
    where = torch.device(device if device.startswith("cuda") else "cpu")
    with torch.random.fork_rng(devices=[]), where:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                vocab_size=49408,
                hidden_act="quick_gelu",
                projection_dim=768,
                # The tiny-sd tokenizer's ids for <|startoftext|> and <|endoftext|>.
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=torch.float16)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SD15_FOLDER}-", dir=model_dir))
    pipe.save_pretrained(staging)
    staging.chmod(0o755)
    os.rename(staging, target)
    del pipe, unet, vae, text_encoder
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"built the random-weight SD 1.5 pipeline into {target} in {time.perf_counter() - started:.1f} s", flush=True)
    return target


def load_pipeline(path: Path, *, device: str) -> Any:
    """The pipeline as the diffusion engine loads it: from disk, then cast and moved."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, torch.float16 if device.startswith("cuda") else torch.float32)


def raw_calls(pipe: Any, *, batch: int, calls: int, size: int, steps: int, device: str, seed: int) -> tuple[list[float], float]:
    """Seconds of each of ``calls`` bare pipeline calls of ``batch`` images, and the CPU
    seconds this process spent on them (all its threads)."""
    import torch

    times = []
    cpu = time.process_time()
    for call in range(calls):
        generators = [torch.Generator("cpu").manual_seed(seed + call * batch + i) for i in range(batch)]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(
                prompt=[f"{PROMPT}, study {i}" for i in range(batch)],
                negative_prompt=[""] * batch,
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=7.5,
                generator=generators,
                output_type="pil",
            )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times, time.process_time() - cpu


def engine_calls(engine: Any, *, model: str, batch: int, calls: int, size: int, steps: int, seed: int) -> list[float]:
    """Seconds of each of ``calls`` ``DiffusionEngine.run_batch`` calls of ``batch`` requests
    (the pipeline call plus the engine's own work: noise per job, PNG encoding)."""
    from blaze_jobs.engines.base import EngineRequest

    times = []
    for call in range(calls):
        requests = [
            EngineRequest(
                job_id=f"raw-{call}-{i}",
                model=model,
                input={
                    "prompt": f"{PROMPT}, study {i}",
                    "width": size,
                    "height": size,
                    "num_inference_steps": steps,
                    "seed": seed + call * batch + i,
                },
            )
            for i in range(batch)
        ]
        started = time.perf_counter()
        results = engine.run_batch(requests)
        times.append(time.perf_counter() - started)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"DiffusionEngine.run_batch failed: {failed[0]!r}")
    return times
