"""vLLM's own worker, with its multimodal-pruning path switched on for PAR's Qwen-VL models.

A Qwen-VL image's kept tokens sit at positions known only once PAR has chosen them, after
vLLM computed the prompt's positions. vLLM has an interface for exactly this
(`SupportsMultiModalPruning.recompute_mrope_positions`, called by the model runner as the
rows reach the language model), but its runners take that path only when
`--video-pruning-rate` is set, and vLLM's CPU runner never does. This worker, given to
vLLM with `--worker-cls par_vllm.worker.ParWorker` (`par-vllm serve` adds it), loads the
model as vLLM's own worker does and then switches the path on when the model asks for it
(`par_places_rows`). It patches nothing: it is vLLM's worker class, subclassed through
vLLM's own extension point.
"""

from __future__ import annotations

from vllm.platforms import current_platform

from . import WORKER_CLS

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _VllmWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _VllmWorker

assert WORKER_CLS == f"{__name__}.ParWorker"


class ParWorker(_VllmWorker):
    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        enable_row_placement(self.model_runner)


def enable_row_placement(runner) -> None:
    """Make `runner` hand each request's multimodal rows to the model's
    recompute_mrope_positions before they reach the language model."""
    model = runner.get_model()
    if not getattr(model, "par_places_rows", False):
        return
    model_state = getattr(runner, "model_state", None)
    if model_state is None:  # vLLM's V1 runner (and its CPU subclass)
        runner.is_multimodal_pruning_enabled = True
        return
    # The V2 runner keeps the path in its model state (vllm/v1/worker/gpu/model_states).
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    if getattr(model_state, "mm_pruner", None) is None:
        if getattr(model_state, "rope_state", None) is None or getattr(model_state, "encoder_cache", None) is None:
            raise RuntimeError("PAR: this vLLM runner keeps no M-RoPE state for the model; "
                               "serve with VLLM_USE_V2_MODEL_RUNNER=0")
        model_state.mm_pruner = MultiModalPruner(model, model_state.rope_state, model_state.encoder_cache,
                                                 runner.model_config.get_inputs_embeds_size())
