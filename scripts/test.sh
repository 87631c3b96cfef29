#!/usr/bin/env bash
# Set everything up and run the whole test suite (real vLLM engine, no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest tests "$@"
