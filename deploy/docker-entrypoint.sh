#!/usr/bin/env bash
# Turn PAR_* environment variables into `par-vllm serve` flags; extra arguments go to vLLM.
set -euo pipefail

args=(serve "${MODEL}" --par-api --host 0.0.0.0 --port "${PORT:-8000}")
[ -n "${PAR_KEEP_RATIO:-}" ] && args+=(--keep-ratio "${PAR_KEEP_RATIO}")
[ -n "${PAR_NUM_TOKENS:-}" ] && args+=(--num-tokens "${PAR_NUM_TOKENS}")
[ -n "${PAR_OUTLIER_FACTOR:-}" ] && args+=(--outlier-factor "${PAR_OUTLIER_FACTOR}")
[ -n "${PAR_RETRIEVAL_SHARE:-}" ] && args+=(--retrieval-share "${PAR_RETRIEVAL_SHARE}")
[ -n "${PAR_MIN_RETRIEVED:-}" ] && args+=(--min-retrieved "${PAR_MIN_RETRIEVED}")
[ -n "${PAR_DUPLICATE_THRESHOLD:-}" ] && args+=(--duplicate-threshold "${PAR_DUPLICATE_THRESHOLD}")
[ -n "${PAR_RELEVANCE:-}" ] && args+=(--relevance "${PAR_RELEVANCE}")
[ -n "${PAR_KNN_K:-}" ] && args+=(--knn-k "${PAR_KNN_K}")
[ -n "${PAR_CENTRES:-}" ] && args+=(--centres "${PAR_CENTRES}")
[ -n "${PAR_CENTRE_RELEVANCE:-}" ] && args+=(--centre-relevance "${PAR_CENTRE_RELEVANCE}")
[ -n "${PAR_SIMILARITY:-}" ] && args+=(--similarity "${PAR_SIMILARITY}")
[ -n "${PAR_ROUTING:-}" ] && args+=(--routing "${PAR_ROUTING}")
[ -n "${PAR_POSITIONS:-}" ] && args+=(--positions "${PAR_POSITIONS}")
[ -n "${PAR_BACKEND:-}" ] && args+=(--backend "${PAR_BACKEND}")
[ "${PAR_DROP_QUESTION_TYPE_WORDS:-1}" = "0" ] && args+=(--keep-question-type-words)
[ "${PAR_ENABLED:-1}" = "0" ] && args+=(--disable)
[ "${PAR_TRUST_REQUEST_SETTINGS:-0}" = "1" ] && args+=(--trust-request-mm-kwargs)

exec par-vllm "${args[@]}" "$@"
