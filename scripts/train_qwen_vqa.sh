#!/usr/bin/env bash
# The Qwen2.5-VL accuracy models of docs/accuracy.md, each run continuing the last: the
# vision tower (stage 1), stages 2-3 at 1-D positions, more of stage 3 at M-RoPE positions,
# then the video model. Hours on a 2-core CPU, so it can stop anywhere: run it again and it
# skips the models already saved and continues a stopped run from its last checkpoint.
# `--until mrope` stops after the image model.
set -euo pipefail
cd "$(dirname "$0")/.."
until_model=video
if [[ "${1:-}" == "--until" ]]; then until_model=$2; fi
train() {  # train OUT ARGS...: unless OUT is saved, (re)start or continue its run
    local out=$1; shift
    if [[ -f "$out/par_model.json" && ! -f "$out/checkpoint.pt" ]]; then
        echo "$out: saved"
    else
        .venv/bin/python -m benchmarks.train_vqa --out "$out" --resume "$@"
    fi
}
train .models/vqa-qwen --family qwen2_5_vl --align-steps 1 --tune-steps 1
train .models/vqa-qwen-1d-steps --family qwen2_5_vl --vision-from .models/vqa-qwen --align-steps 145 \
    --tune-steps 404 --positions 1d
train .models/vqa-qwen-mrope --init .models/vqa-qwen-1d-steps --tune-steps 200
[[ "$until_model" == "mrope" ]] && exit 0
train .models/vqa-qwen-video --init .models/vqa-qwen-mrope --task video --tune-steps 100 --batch 4
