"""Qwen2.5-VL, Qwen3-VL and Qwen3.5 with PAR: vLLM's own models, every kept token at its
true (t, h, w) M-RoPE position.

N per image is the processor's own `image_grid_thw` after the 2x2 merge (448x448 is 256
tokens in Qwen2.5-VL, 196 in Qwen3-VL), rows in raster order. PAR keeps K of them; with
`par_positions` "span" (the default here) each kept token sits at the position it has in
the whole image and the text after the image starts where it would unreduced
(par_vllm/positions.py says how, through vLLM's multimodal-pruning interface and the
plugin's worker, par_vllm/worker.py). Qwen3.5 is Qwen3-VL's vision side and processor in
front of a hybrid language model. Qwen3-VL's rows carry its deepstack features beside
the main embedding: PAR scores the main embedding and the deepstack columns follow the
same selection and merge. Videos pass through unreduced.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import BatchFeature
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_5 import Qwen3_5ForConditionalGeneration, Qwen3_5ProcessingInfo
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.exceptions import VLLMValidationError
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.utils.import_utils import resolve_obj_by_qualname

from ..dispatch import reduce_per_image
from ..positions import grid_offsets, place_rows, position_columns, reduced_prompt_positions
from ..settings import ParSettingError, ParSettings
from ..worker import WORKER_CLS, ParWorker
from .base import LAYOUT_KEY, QUERY_KEY, SETTINGS_KEY, Layout, ParModel, ParMultiModalProcessor, ParProcessingInfo


class ParQwenProcessingInfo(ParProcessingInfo):
    def image_layout(self, width: int, height: int) -> Layout:
        # For the request metrics of images the processor has not seen; placeholders are
        # counted from the processor's own image_grid_thw (processed_layouts).
        return Layout(self.get_num_image_tokens(image_width=width, image_height=height,
                                                image_processor=self.get_image_processor(), mm_kwargs={}))


class ParQwenMultiModalProcessor(ParMultiModalProcessor):
    def processed_layouts(self, processed_data: BatchFeature) -> list[Layout] | None:
        grids = processed_data.get("image_grid_thw")
        if grids is None:
            return None
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        return [Layout(int(grid.prod()) // merge**2) for grid in grids]

    def apply(self, inputs, timing_ctx):
        result = super().apply(inputs, timing_ctx)
        # A kept token's base is read from the token before its run of placeholders, so
        # two images' placeholders must not touch (Qwen's chat template and placeholder
        # string put <|vision_start|> and <|vision_end|> around each).
        ranges = sorted((r.offset, r.offset + r.length) for ranges in result["mm_placeholders"].values()
                        for r in ranges)
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            if start <= end:
                raise VLLMValidationError(
                    "two images or videos follow each other with no token between them; write each "
                    "as <|vision_start|><|image_pad|><|vision_end|>", parameter="prompt")
        return result


class ParQwenModel(ParModel):
    """Mixed in before vLLM's Qwen2.5-VL, Qwen3-VL or Qwen3.5 model class."""

    # Asks the plugin's worker to pass every multimodal row through
    # recompute_mrope_positions (par_vllm/worker.py).
    par_places_rows = True

    @staticmethod
    def prepare_positions(vllm_config, server_settings: ParSettings) -> bool:
        worker = vllm_config.parallel_config.worker_cls
        resolved = resolve_obj_by_qualname(worker) if isinstance(worker, str) and worker != "auto" else worker
        if not (isinstance(resolved, type) and issubclass(resolved, ParWorker)):
            raise ParSettingError(
                f"PAR on Qwen-VL places kept tokens through vLLM's multimodal-pruning path, which "
                f"vLLM's own worker leaves off for images: serve with --worker-cls {WORKER_CLS} "
                "(par-vllm serve adds it)", setting="worker_cls")
        pruning = vllm_config.model_config.get_multimodal_config().video_pruning_rate
        if pruning:
            raise ParSettingError(
                "--video-pruning-rate (vLLM's EVS) and PAR cannot both place a Qwen-VL model's "
                "multimodal tokens: serve without --video-pruning-rate", setting="video_pruning_rate")
        return True

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        family = super(ParModel, self)  # the family's own placement, after ParModel's
        reduced = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image" or LAYOUT_KEY not in (feature.data or {}):
                continue
            full = Layout.unpack(feature.data[LAYOUT_KEY].data).full
            if feature.mm_position.length < full:
                span = ParSettings.from_tensor(feature.data[SETTINGS_KEY].data).positions == "span"
                reduced.append((feature, full, span))
        if not reduced:
            return family.get_mrope_input_positions(input_tokens, mm_features)

        def unreduced_positions(tokens, expansions):
            moved = {id(feature): (offset, full) for (feature, _, _), (offset, full) in zip(reduced, expansions)}
            features, grown = [], 0
            for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
                position = feature.mm_position
                offset, length = moved.get(id(feature), (position.offset + grown, position.length))
                grown = offset + length - position.offset - position.length
                features.append(replace(feature, mm_position=replace(position, offset=offset, length=length)))
            return family.get_mrope_input_positions(tokens, features)

        return reduced_prompt_positions(
            input_tokens, [(f.mm_position.offset, f.mm_position.length, full, span) for f, full, span in reduced],
            unreduced_positions)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        return place_rows(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens,
                          (self.config.image_token_id, self.config.video_token_id))

    def get_encoder_cudagraph_config(self):
        # Rows get their position columns in embed_multimodal, which vLLM's encoder CUDA
        # graphs bypass.
        return replace(super().get_encoder_cudagraph_config(), modalities=[])

    def embed_multimodal(self, **kwargs: object):
        query_ids = kwargs.pop(QUERY_KEY, None)
        packed_settings = kwargs.pop(SETTINGS_KEY, None)
        kwargs.pop(LAYOUT_KEY, None)  # N is each image's own row count here
        rows = []
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                features = list(self._process_image_input(inputs))
                grids = inputs["image_grid_thw"].tolist()
                rows += self._reduce_images(features, grids, packed_settings, query_ids)
            else:
                rows += [torch.cat([video, position_columns(None, len(video), video)], dim=1)
                         for video in self._process_video_input(inputs)]
        return tuple(rows)

    def _reduce_images(self, features, grids, packed_settings, query_ids) -> list[torch.Tensor]:
        if packed_settings is None:  # start-up profiling's dummy images
            return [torch.cat([f, position_columns(None, len(f), f)], dim=1) for f in features]
        settings = [ParSettings.from_tensor(row) for row in packed_settings]
        merge = self.config.vision_config.spatial_merge_size
        reduced = reduce_per_image(
            features, list(query_ids), settings, embed_tokens=self.get_language_model().embed_input_ids,
            on_batch=self._count_batch, on_kernel_failure=self._count_kernel_failure,
            score_dims=self.par_score_dims, with_kept=True,
            grids=[(height // merge, width // merge) for _, height, width in grids])
        out = []
        for (tokens, kept), feature, (_, height, width), setting in zip(reduced, features, grids, settings):
            placed = len(tokens) < len(feature) and setting.positions == "span"
            offsets = grid_offsets(height // merge, width // merge)[kept.cpu()] if placed else None
            out.append(torch.cat([tokens, position_columns(offsets, len(tokens), tokens)], dim=1))
        return out

    @property
    def par_score_dims(self) -> int | None:
        # Qwen3-VL's rows carry deepstack features beside the main embedding: PAR scores the
        # main embedding and the deepstack columns follow.
        return self.visual_dim if getattr(self, "deepstack_num_level", 0) else None


class ParQwen2_5_VLProcessingInfo(ParQwenProcessingInfo, Qwen2_5_VLProcessingInfo):
    pass


class ParQwen2_5_VLMultiModalProcessor(ParQwenMultiModalProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ParQwen2_5_VLMultiModalProcessor,
    info=ParQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class ParQwen2_5_VLForConditionalGeneration(ParQwenModel, Qwen2_5_VLForConditionalGeneration):
    pass


class ParQwen3VLProcessingInfo(ParQwenProcessingInfo, Qwen3VLProcessingInfo):
    pass


class ParQwen3VLMultiModalProcessor(ParQwenMultiModalProcessor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ParQwen3VLMultiModalProcessor,
    info=ParQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ParQwen3VLForConditionalGeneration(ParQwenModel, Qwen3VLForConditionalGeneration):
    pass


class ParQwen3_5ProcessingInfo(ParQwenProcessingInfo, Qwen3_5ProcessingInfo):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ParQwen3VLMultiModalProcessor,
    info=ParQwen3_5ProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ParQwen3_5ForConditionalGeneration(ParQwenModel, Qwen3_5ForConditionalGeneration):
    pass
