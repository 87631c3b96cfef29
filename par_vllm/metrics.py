"""PAR's Prometheus metrics, served on vLLM's own /metrics.

Counted by the multimodal processor, which runs in the API-server process that also
serves /metrics, so they appear with no extra set-up. Names carry a `par_` prefix (vLLM
unregisters `vllm:*` collectors it does not own) and a `model_name` label, as vLLM's do.
"""

from prometheus_client import Counter, Histogram

LABELS = ["model_name"]
# Per item: `modality` is "image" or "video".
ITEM_LABELS = [*LABELS, "modality"]

images_reduced = Counter(
    "par_images_reduced", "Images (or videos, by modality) whose visual tokens PAR reduced (K < N).",
    ITEM_LABELS)
visual_tokens_before = Counter(
    "par_visual_tokens_before", "Visual tokens the images or videos would take without PAR (N).", ITEM_LABELS)
visual_tokens_after = Counter(
    "par_visual_tokens_after", "Visual tokens reserved after PAR (K): what the KV cache holds.", ITEM_LABELS)
visual_tokens_saved = Counter(
    "par_visual_tokens_saved", "Visual tokens PAR removed before the language model (N - K).", ITEM_LABELS)
kept_share = Histogram(
    "par_kept_share", "Share of an image's or video's visual tokens kept (K / N).", ITEM_LABELS,
    buckets=(0.02, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5, 0.75, 0.99, 1.0))
prompt_agnostic_requests = Counter(
    "par_prompt_agnostic_requests",
    "Requests with images but no content words left after prompt rewriting (an image alone, "
    "or 'what color is it?'): PAR fell back to a prompt-agnostic score.", LABELS)
disabled_requests = Counter(
    "par_disabled_requests", "Requests with images served whole (par_enabled=false or ratio 1).", LABELS)

# Counted where the reduction runs, in the engine's worker processes: these reach /metrics
# only in prometheus multiprocess mode (PROMETHEUS_MULTIPROC_DIR exported before the server
# starts, as the Docker entrypoint does).
engine_batches = Counter(
    "par_engine_batches",
    "Batches of images the engine reduced, by implementation (torch reference or Triton kernels).",
    [*LABELS, "implementation"])
feature_cache_lookups = Counter(
    "par_feature_cache_lookups",
    "Images (or videos, by modality) the engine looked up in its feature cache before the vision "
    "tower: result=hit where it reduced them from the rows kept there instead of encoding them again.",
    [*ITEM_LABELS, "result"])
kernel_fallbacks = Counter(
    "par_kernel_fallbacks",
    "Batches of images whose Triton kernels failed and that the torch reference reduced instead.",
    LABELS)

ALL = (images_reduced, visual_tokens_before, visual_tokens_after, visual_tokens_saved, kept_share,
       prompt_agnostic_requests, disabled_requests, engine_batches, feature_cache_lookups, kernel_fallbacks)


def record_request(model_name: str, items: dict[str, tuple[list[int], list[int]]], disabled: bool,
                   prompt_agnostic: bool) -> None:
    """One request: `items` maps a modality to its items' (N, K) lists."""
    labels = {"model_name": model_name}
    for modality, (full, kept) in items.items():
        item = {**labels, "modality": modality}
        for n, k in zip(full, kept):
            visual_tokens_before.labels(**item).inc(n)
            visual_tokens_after.labels(**item).inc(k)
            visual_tokens_saved.labels(**item).inc(n - k)
            kept_share.labels(**item).observe(k / n)
            if k < n:
                images_reduced.labels(**item).inc()
    if disabled:
        disabled_requests.labels(**labels).inc()
    elif prompt_agnostic:
        prompt_agnostic_requests.labels(**labels).inc()
