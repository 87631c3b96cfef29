#!/usr/bin/env bash
# Set everything up, build the random-weight demo model, serve it with PAR and compare
# one chat request with and without PAR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/par-vllm demo "$@"
