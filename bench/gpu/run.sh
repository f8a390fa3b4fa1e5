#!/usr/bin/env bash
# The GPU benchmark run, for one device call from the repo root:
#   bash bench/gpu/run.sh [bench/batching.py options]   (carry: .whl and bench/gpu/redis-server,
#   which bench/gpu/prepare.sh makes on a machine with a package index)
# Installs the carried wheels (.whl: celery, kombu, redis, fastapi, pydantic, uvicorn,
# httptools, diffusers … that the GPU image lacks) into /tmp/site, puts the carried
# redis-server (bench/gpu, glibc-only) on PATH for blaze_jobs.stack, and runs
# bench/batching.py with the SD 1.5-shaped pipeline at 512x512. Everything lands in $OUT:
# setup.log, batching-gpu.log, batching-gpu.json and stack-logs.tgz (redis/api/worker logs).
set -o pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/bench/gpu:$PATH
(
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  chmod +x bench/gpu/redis-server
  nvidia-smi -L
  bench/gpu/redis-server --version
  python3 - <<'EOF' || exit 4
import importlib, sys
from importlib.metadata import version
print(sys.version.split()[0], sys.executable)
for dist, mod in [("torch", "torch"), ("diffusers", "diffusers"), ("transformers", "transformers"),
                  ("huggingface-hub", "huggingface_hub"), ("accelerate", "accelerate"), ("safetensors", "safetensors"),
                  ("tokenizers", "tokenizers"), ("celery", "celery"), ("kombu", "kombu"), ("redis", "redis"),
                  ("fastapi", "fastapi"), ("starlette", "starlette"), ("pydantic", "pydantic"),
                  ("uvicorn", "uvicorn"), ("uvloop", "uvloop"), ("httptools", "httptools"), ("click", "click"),
                  ("typing-extensions", "typing_extensions"), ("anyio", "anyio"), ("httpx", "httpx"), ("orjson", "orjson")]:
    print(f"{dist:18} {version(dist):14} {importlib.import_module(mod).__file__}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
import blaze_jobs.celeryconfig, blaze_jobs.api.app, blaze_jobs.stack, blaze_jobs.engines.diffusion
print("redis-server for the stack:", blaze_jobs.stack.redis_server_binary())
EOF
) 2>&1 | tee "$OUT/setup.log" || exit $?
# Arguments to this script replace the benchmark's defaults below (--json is always added).
[ $# -gt 0 ] || set -- --sd15 --device cuda --size 512 --steps 20 --batch 1 4 8
echo "python3 bench/batching.py $* --json $OUT/batching-gpu.json"
timeout -k 15 520 python3 bench/batching.py "$@" --json "$OUT/batching-gpu.json" 2>&1 | tee "$OUT/batching-gpu.log"
rc=$?
echo "bench/batching.py exit status $rc (0 goals met, 1 failure, 2 goal missed, 124 timed out)"
# The stack's logs (redis, api, worker-b*-t*), from Stack's default mkdtemp folders.
(cd /tmp && ls -d blaze-stack-* >/dev/null 2>&1 && tar czf "$OUT/stack-logs.tgz" --exclude='*/redis' blaze-stack-*)
if [ $rc -ne 0 ] && [ $rc -ne 2 ]; then
  for f in /tmp/blaze-stack-*/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 40 "$f"; }; done
fi
exit $rc
