"""The diffusion pipelines ``bench/batching.py`` measures the system against: ones of the
Stable Diffusion 1.5 and SDXL architectures with random weights (built with no download: the
GPU machine has no network), loaded as the diffusion engine loads them, and the raw baselines
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
#: Folder of the random-weight SDXL pipeline; bump when the builder changes.
SDXL_FOLDER = "sdxl-random-v1"


def build_sd15(model_dir: Path, *, device: str) -> Path:
    """A Stable Diffusion 1.5-shaped pipeline with random weights, saved under ``model_dir``.

    The UNet, VAE and text encoder take SD 1.5's published config values; the tokenizer and
    the scheduler are the built-in tiny-sd's (CLIP-style BPE, SD 1.5's PNDM settings), so
    nothing is downloaded. Weights are stored in fp16 (about 2 GB).
    """
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

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
        vae = _vae(sample_size=512)
        text_encoder = CLIPTextModel(_clip_config(768))
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
    del unet, vae, text_encoder
    return _save(pipe, target, device=device, started=started)


def _clip_config(width: int) -> Any:
    """The text encoder config of CLIP ViT-L (768 wide: SD 1.5, SDXL's first encoder) or of
    OpenCLIP ViT-bigG (1280 wide: SDXL's second), as the published models have them."""
    from transformers import CLIPTextConfig

    big = width == 1280
    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=32 if big else 12,
        num_attention_heads=20 if big else 12,
        hidden_act="gelu" if big else "quick_gelu",
        projection_dim=width,
        max_position_embeddings=77,
        vocab_size=49408,
        # The tiny tokenizers' ids for <|startoftext|> and <|endoftext|>.
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _vae(**config: Any) -> Any:
    """The VAE of Stable Diffusion 1.5 and SDXL (they differ in sample size and scaling)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        **config,
    )


def _save(pipe: Any, target: Path, *, device: str, started: float) -> Path:
    # Beside the target, then renamed into place: a run cut short leaves no half model.
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    pipe.save_pretrained(staging)
    staging.chmod(0o755)
    os.rename(staging, target)
    name = type(pipe).__name__
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"built a random-weight {name} into {target} in {time.perf_counter() - started:.1f} s", flush=True)
    return target


def build_sdxl(model_dir: Path, *, device: str) -> Path:
    """An SDXL 1.0-shaped pipeline (base UNet, CLIP ViT-L and OpenCLIP ViT-bigG encoders, its
    VAE) with random weights, saved under ``model_dir`` in fp16 (about 7 GB).

    The configs are SDXL base 1.0's published values; tokenizers and scheduler settings are
    the built-in tiny-sdxl's (CLIP-style BPE, SDXL's Euler settings), so nothing is downloaded.
    Random weights cost what trained ones do: the same shapes, the same kernels.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from blaze_jobs.builtin_models import builtin_path

    target = model_dir / SDXL_FOLDER
    if (target / "model_index.json").exists():
        return target
    started = time.perf_counter()
    tiny = builtin_path("builtin:tiny-sdxl", model_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer_2")
    scheduler = EulerDiscreteScheduler.from_pretrained(tiny, subfolder="scheduler")
    where = torch.device(device if device.startswith("cuda") else "cpu")
    with torch.random.fork_rng(devices=[]), where:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            # The second encoder's pooled 1280 values and six size ids of 256 each.
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
        )
        vae = _vae(sample_size=1024, scaling_factor=0.13025)
        text_encoder = CLIPTextModel(_clip_config(768))
        # OpenCLIP ViT-bigG: 32 layers of 1280, 20 heads, projected to 1280 for the pooled output.
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(1280))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    ).to(dtype=torch.float16)
    del unet, vae, text_encoder, text_encoder_2
    return _save(pipe, target, device=device, started=started)


def load_pipeline(path: Path, *, device: str) -> Any:
    """The pipeline as the diffusion engine loads it: from disk, then cast and moved."""
    from blaze_jobs.engines.diffusion_pipelines import DiffusionModelOptions
    from blaze_jobs.engines.diffusion_pipelines import load_pipeline as engine_load

    # The engine's own loader, with every memory option off, as the worker loads the model:
    # fp16 on CUDA, fp32 on a CPU.
    return engine_load(str(path), path, device=device, options=DiffusionModelOptions())


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
