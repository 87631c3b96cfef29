"""par-vllm: Prompt-Aware Token Reduction (PAR) for multimodal models served by vLLM."""

# The checkpoint's architecture -> the PAR class that serves it, and where vLLM finds it.
FAMILIES = {
    "LlavaForConditionalGeneration": ("ParLlavaForConditionalGeneration", "par_vllm.models.llava"),
    "LlavaNextForConditionalGeneration": ("ParLlavaNextForConditionalGeneration", "par_vllm.models.llava_next"),
    "Qwen2_5_VLForConditionalGeneration": ("ParQwen2_5_VLForConditionalGeneration", "par_vllm.models.qwen_vl"),
    "Qwen3VLForConditionalGeneration": ("ParQwen3VLForConditionalGeneration", "par_vllm.models.qwen_vl"),
    "Qwen3_5ForConditionalGeneration": ("ParQwen3_5ForConditionalGeneration", "par_vllm.models.qwen_vl"),
}
# Families whose kept tokens vLLM's multimodal-pruning path places (they need the
# plugin's worker, par_vllm.worker); the others get M-RoPE switched on by an override.
PLACES_ROWS = {"ParQwen2_5_VLForConditionalGeneration", "ParQwen3VLForConditionalGeneration",
               "ParQwen3_5ForConditionalGeneration"}
WORKER_CLS = "par_vllm.worker.ParWorker"
ARCHITECTURES = {par: module for par, module in FAMILIES.values()}
ARCHITECTURE = FAMILIES["LlavaForConditionalGeneration"][0]  # LLaVA-1.5's, the demo model's
__version__ = "0.1.0"


def register() -> None:
    """vLLM general plugin: make the PAR architectures and the no-URL-fetch media connector
    available (idempotent; vLLM calls this in every process: API server, engine core,
    workers)."""
    from vllm import ModelRegistry

    from .media import register as register_media_connector

    register_media_connector()
    supported = ModelRegistry.get_supported_archs()
    for architecture, module in ARCHITECTURES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, f"{module}:{architecture}")


def par_architecture(architectures: list[str]) -> str:
    """The PAR class for a checkpoint's `architectures`; ValueError naming the supported
    families otherwise."""
    for name in architectures:
        if name in FAMILIES:
            return FAMILIES[name][0]
        if name in ARCHITECTURES:
            return name
    raise ValueError(f"PAR does not serve {', '.join(architectures) or 'this architecture'} yet; "
                     f"supported: {', '.join(FAMILIES)}")
