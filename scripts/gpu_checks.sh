#!/usr/bin/env bash
# The checks that wait for a GPU, in one run: the Triton kernels against the torch reference
# (tests), the kernel benchmark at LLaVA-1.5 / NeXT sizes, and PAR's own time and memory per
# image at N = 1,024, 4,096 and 16,384. Written for the lent device machine, which has torch,
# triton and transformers but neither vLLM nor a network:
#
#   bash scripts/gpu_checks.sh --wheels   # here, with a network: the other packages the
#                                         # checks import, as wheels in .whl/ (git-ignored)
#   bash scripts/gpu_checks.sh            # there (the device tool, carry [".whl"])
#
# Results are written to benchmarks/results/ and copied to $OUT where it is set. Exits 1
# if any step failed; every step runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NEEDS=("pydantic>=2" pytest)
BUILD=("setuptools>=70" wheel)  # for the editable install below

if [ "${1:-}" = "--wheels" ]; then
  # The device's Python version is not known here: wheels for each one it may run.
  for version in 3.10 3.11 3.12 3.13; do
    "$PYTHON" -m pip download -q -d .whl --only-binary=:all: --python-version "$version" \
      --platform manylinux2014_x86_64 "${NEEDS[@]}" "${BUILD[@]}" || exit 1
  done
  exit 0
fi

status=0
step() {
  echo "== $*"
  "$@" || { echo "== FAILED: $*"; status=1; }
}
step "$PYTHON" -m pip install -q --no-index --find-links .whl "${NEEDS[@]}"
# par_vllm.kernels lives in kernels/ (setup.py's package_dir): an editable install maps it,
# but only a setuptools that installs an import finder for it (an older one links the
# repository root alone, where par_vllm has no kernels/).
step "$PYTHON" -m pip install -q --no-index --find-links .whl --upgrade "${BUILD[@]}"
step "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e .
"$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
step "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_reduction.py tests/test_blocked.py
step "$PYTHON" -m benchmarks.kernels
step "$PYTHON" -m benchmarks.par_cost --gpu --sizes 1024 4096 16384
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/kernels-*.* benchmarks/results/par-cost-gpu.* "$OUT"/ 2>/dev/null
fi
exit "$status"
