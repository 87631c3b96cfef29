"""par-vllm: Prompt-Aware Token Reduction (PAR) for LLaVA served by vLLM."""

ARCHITECTURE = "ParLlavaForConditionalGeneration"
__version__ = "0.1.0"


def register() -> None:
    """vLLM general plugin: make the PAR architecture and the no-URL-fetch media connector
    available (idempotent; vLLM calls this in every process: API server, engine core,
    workers)."""
    from vllm import ModelRegistry

    from .media import register as register_media_connector

    register_media_connector()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "par_vllm.models.llava:ParLlavaForConditionalGeneration"
        )
