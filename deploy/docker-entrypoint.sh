#!/usr/bin/env bash
# Start `par-vllm serve`, which reads each PAR setting's PAR_* variable itself
# (docs/settings.md); extra arguments go to vLLM. What clients can reach is bounded by
# default (docs/operating.md): no media URL fetching, a bounded request body, a bounded
# number and size of images per request, per-request settings off.
set -euo pipefail

args=(serve "${MODEL}" --par-api --host 0.0.0.0 --port "${PORT:-8000}")
[ "${PAR_TRUST_REQUEST_SETTINGS:-0}" = "1" ] && args+=(--trust-request-mm-kwargs)
# The PAR class comes from the checkpoint's config; name its architecture where that cannot be read.
[ -n "${PAR_ARCHITECTURE:-}" ] && args+=(--architecture "${PAR_ARCHITECTURE}")

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
# A video's frames all go through the vision encoder, reduced or not: one per request unless
# the operator says otherwise (vLLM's own default is 999). Models without video ignore it.
args+=(--limit-mm-per-prompt "{\"image\": ${PAR_MAX_IMAGES_PER_REQUEST:-4}, \"video\": ${PAR_MAX_VIDEOS_PER_REQUEST:-1}}")
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
