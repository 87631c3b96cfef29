#!/usr/bin/env bash
# Turn PAR_* environment variables into `par-vllm serve` flags; extra arguments go to vLLM.
# The server's exposure is safe by default (docs/operating.md): no media URL fetching, a
# bounded request body, a bounded number and size of images per request.
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
[ -n "${PAR_ALLOWED_REQUEST_KWARGS:-}" ] && args+=(--allowed-request-kwargs "${PAR_ALLOWED_REQUEST_KWARGS}")
[ "${PAR_DROP_QUESTION_TYPE_WORDS:-1}" = "0" ] && args+=(--keep-question-type-words)
[ "${PAR_ENABLED:-1}" = "0" ] && args+=(--disable)
[ "${PAR_TRUST_REQUEST_SETTINGS:-0}" = "1" ] && args+=(--trust-request-mm-kwargs)

# Media URLs: none are fetched unless PAR_ALLOWED_MEDIA_DOMAINS lists the hosts that may be
# (comma-separated); then redirects are not followed either, so an allowed host cannot
# send the server on to an internal address.
if [ -n "${PAR_ALLOWED_MEDIA_DOMAINS:-}" ]; then
  IFS=',' read -ra domains <<< "${PAR_ALLOWED_MEDIA_DOMAINS}"
  args+=(--allowed-media-domains "${domains[@]}")
  export VLLM_MEDIA_URL_ALLOW_REDIRECTS="${VLLM_MEDIA_URL_ALLOW_REDIRECTS:-0}"
else
  export VLLM_MEDIA_CONNECTOR="${VLLM_MEDIA_CONNECTOR:-par_no_url_fetch}"
fi
args+=(--limit-mm-per-prompt "{\"image\": ${PAR_MAX_IMAGES_PER_REQUEST:-4}}")
args+=(--middleware par_vllm.limits.RequestBodyLimit)
export PAR_MAX_REQUEST_BYTES="${PAR_MAX_REQUEST_BYTES:-33554432}"
export VLLM_MAX_IMAGE_PIXELS="${VLLM_MAX_IMAGE_PIXELS:-40000000}"
# Prometheus multiprocess mode, so that what the engine's workers count (the reduction's
# implementation, kernel fallbacks) reaches /metrics too; a fresh directory per start.
if [ -z "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
  PROMETHEUS_MULTIPROC_DIR="$(mktemp -d)"
  export PROMETHEUS_MULTIPROC_DIR
fi

exec par-vllm "${args[@]}" "$@"
