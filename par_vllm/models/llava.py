"""LLaVA-1.5 with PAR: vLLM's LLaVA, reserving K placeholders per image instead of N.

Every row the model emits for an image is a visual token (576 for a 336 px image), and
N depends only on the processed image's size.
"""

from __future__ import annotations

from transformers import BatchFeature
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .base import Layout, ParModel, ParMultiModalProcessor, ParProcessingInfo


class ParLlavaProcessingInfo(ParProcessingInfo, LlavaProcessingInfo):
    pass


class ParLlavaMultiModalProcessor(ParMultiModalProcessor, LlavaMultiModalProcessor):
    def processed_layouts(self, processed_data: BatchFeature, modality: str = "image") -> list[Layout] | None:
        images = processed_data.get("pixel_values", processed_data.get("image_embeds"))
        if images is None:
            return None
        if images[0].ndim == 2:  # image embeddings: N x hidden
            return [Layout(image.shape[0]) for image in images]
        return [self.info.image_layout(image.shape[-1], image.shape[-2]) for image in images]


@MULTIMODAL_REGISTRY.register_processor(
    ParLlavaMultiModalProcessor,
    info=ParLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ParLlavaForConditionalGeneration(ParModel, LlavaForConditionalGeneration, SupportsMRoPE):
    pass
