"""LLaVA-NeXT (AnyRes) with PAR: vLLM's LLaVA-NeXT, one budget over the base view and the
tiles together.

vLLM's model emits, per image, the base view's visual tokens, then the unpadded tile grid
row by row, each grid row ending in the learned `image_newline` separator (672x672: 576 +
2,304 visual tokens and 48 separators). PAR scores, clusters and merges the visual tokens
only: K = ceil(visual x ratio) of them are kept, in their original order (base view first,
then the tiles in raster order), followed by one separator; the other separators go. With
nothing removed the image is served exactly as vLLM's own model serves it.
"""

from __future__ import annotations

from transformers import BatchFeature
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_next import get_anyres_image_grid_shape
from vllm.multimodal import MULTIMODAL_REGISTRY

from .base import Layout, ParModel, ParMultiModalProcessor, ParProcessingInfo


class ParLlavaNextProcessingInfo(ParProcessingInfo, LlavaNextProcessingInfo):
    def image_layout(self, width: int, height: int) -> Layout:
        vision = self.get_vision_encoder_info()
        grid_h, grid_w = get_anyres_image_grid_shape(
            image_size=(height, width), grid_pinpoints=self.get_hf_config().image_grid_pinpoints,
            patch_size=vision.get_image_size())
        unpadded, rows = self._get_num_unpadded_features(
            original_height=height, original_width=width, npatches=vision.get_patch_grid_length(),
            num_patch_height=grid_h, num_patch_width=grid_w)
        full = self.get_num_image_tokens(image_width=width, image_height=height)
        return Layout(full=full, rows=rows, row_width=unpadded // rows)


class ParLlavaNextMultiModalProcessor(ParMultiModalProcessor, LlavaNextMultiModalProcessor):
    def processed_layouts(self, processed_data: BatchFeature, modality: str = "image") -> list[Layout] | None:
        if "image_embeds" in processed_data:
            return [Layout(embeds.shape[0]) for embeds in processed_data["image_embeds"]]
        if "image_sizes" not in processed_data:
            return None
        # N from the original size the processor reports, never from the 336 px crops.
        return [self.info.image_layout(int(w), int(h)) for h, w in processed_data["image_sizes"].tolist()]


@MULTIMODAL_REGISTRY.register_processor(
    ParLlavaNextMultiModalProcessor,
    info=ParLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ParLlavaNextForConditionalGeneration(ParModel, LlavaNextForConditionalGeneration, SupportsMRoPE):
    pass
