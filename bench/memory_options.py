"""``python bench/memory_options.py``: what each diffusion memory option (``BLAZE_DIFFUSION_MODEL_OPTIONS``)
does to peak memory and to time, against the model loaded with every option off, in one run.

Each configuration runs in a process of its own, so its peak is its own: the pipeline is
loaded by the engine's loader (``diffusion_pipelines.load_pipeline``) with the options, then
called (a warm-up call, then ``--calls`` timed ones) with ``--batch`` prompts at ``--size``.
The peak is the device's (``torch.cuda.max_memory_allocated`` from just before the first
call: what the calls add to the weights, and the weights) on CUDA, and the process's peak
resident memory on a CPU. The table gives each option's peak and median call time beside the
baseline's, and their ratios. ``cpu_offload`` acts only on CUDA (the engine skips it
elsewhere) and ``bf16`` (against the default fp16) is measured only there, so a CPU run
leaves both out.

``--sdxl`` or ``--sd15`` builds (once, no download) a random-weight pipeline of that
architecture, as ``bench/batching.py`` does: use ``--sdxl --device cuda --size 1024`` on a
GPU. Without either, the built-in tiny model at 64×64 checks the script on a CPU.

Exit status: 0 when every configuration ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine, write_json
from pipelines import build_sd15, build_sdxl, raw_calls  # keeps the Hugging Face hub offline

#: The configurations measured, by name: the options each sets. "none" is the baseline.
CONFIGS: dict[str, dict[str, Any]] = {
    "none": {},
    "attention_slicing": {"attention_slicing": True},
    "vae_slicing": {"vae_slicing": True},
    "vae_tiling": {"vae_tiling": True},
    "slicing+tiling": {"attention_slicing": True, "vae_slicing": True, "vae_tiling": True},
    "bf16": {"dtype": "bf16"},
    "cpu_offload": {"cpu_offload": True},
}
#: Those that act only on CUDA.
CUDA_ONLY = {"cpu_offload", "bf16"}


def one(path: str, options: dict[str, Any], *, device: str, batch: int, size: int, steps: int, calls: int) -> dict[str, Any]:
    """One configuration, in this process: load, call, and measure."""
    import torch

    from blaze_jobs.engines.diffusion_pipelines import DiffusionModelOptions, load_pipeline

    cuda = device.startswith("cuda")
    started = time.perf_counter()
    pipe = load_pipeline(path, path, device=device, options=DiffusionModelOptions(**options))
    load_s = time.perf_counter() - started
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        weights = torch.cuda.memory_allocated(device)
    # The first call warms up; the peak counts it too (the same shapes as the others).
    times, _ = raw_calls(pipe, batch=batch, calls=calls + 1, size=size, steps=steps, device=device, seed=0)
    times = times[1:]
    result: dict[str, Any] = {"load_s": round(load_s, 2), "median_call_s": statistics.median(times), "calls": times}
    if cuda:
        result.update(peak_mib=torch.cuda.max_memory_allocated(device) / 2**20, weights_mib=weights / 2**20)
    else:  # ru_maxrss is in KiB on Linux
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--sd15", action="store_true", help="a random-weight SD 1.5-shaped pipeline (for a GPU at 512)")
    shapes.add_argument("--sdxl", action="store_true", help="a random-weight SDXL-shaped pipeline (for a GPU at 1024)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 …")
    parser.add_argument("--size", type=int, default=64, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per configuration")
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="configurations to run (the baseline always runs)")
    parser.add_argument("--model-dir", type=Path, default=None, help="where models are built (default BLAZE_MODEL_DIR)")
    parser.add_argument("--json", help="also write a JSON summary here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child's configuration, as JSON
    args = parser.parse_args(argv)
    shape = {"device": args.device, "batch": args.batch, "size": args.size, "steps": args.steps, "calls": args.calls}
    if args.one:
        child = json.loads(args.one)
        print(json.dumps(one(child["path"], child["options"], **shape)))
        return 0

    from blaze_jobs.settings import get_settings

    model_dir = (args.model_dir or get_settings().model_dir).expanduser().resolve()
    if args.sd15 or args.sdxl:
        path = str((build_sd15 if args.sd15 else build_sdxl)(model_dir, device=args.device))
    else:
        from blaze_jobs.builtin_models import builtin_path

        path = str(builtin_path("builtin:tiny-sd", model_dir))
    cuda = args.device.startswith("cuda")
    names = ["none", *(n for n in (args.only or CONFIGS) if n != "none")]
    names = [n for n in names if cuda or n not in CUDA_ONLY]
    print(
        f"memory options: {path} {args.size}x{args.size}, {args.steps} steps, batch {args.batch}, {args.device}; "
        f"load average {machine()['loadavg']}",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        child = json.dumps({"path": path, "options": CONFIGS[name]})
        command = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--one", child]
        run = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            print(f"{name}: failed (exit {run.returncode})\n{run.stderr[-2000:]}", flush=True)
            results[name] = {"failed": run.stderr[-2000:]}
            continue
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"  {name:18} peak {results[name]['peak_mib']:9.0f} MiB   median call {results[name]['median_call_s']:.3f} s",
            flush=True,
        )

    base = results.get("none", {})
    peak_of = "device memory allocated" if cuda else "process resident memory"
    print(f"\n{'options':18} {'peak MiB':>9} {'/ none':>7} {'call s':>8} {'/ none':>7}   (peak: {peak_of})")
    for name, found in results.items():
        if "failed" in found or "failed" in base:
            print(f"{name:18} {'failed':>9}")
            continue
        memory, seconds = found["peak_mib"] / base["peak_mib"], found["median_call_s"] / base["median_call_s"]
        print(f"{name:18} {found['peak_mib']:>9.0f} {memory:>7.3f} {found['median_call_s']:>8.3f} {seconds:>7.3f}")
    print(f"load average now {machine()['loadavg']}")
    write_json(args.json, {"benchmark": "memory_options", "path": path, **shape, "results": results, "machine": machine()})
    return 1 if any("failed" in found for found in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
