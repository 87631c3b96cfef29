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
same selection and merge.

Qwen2.5-VL's videos are reduced too: a video is one run of placeholders (its frames' tokens
in (t, h, w) raster order), one item with its own K, scored against the same prompt, and
PAR's clustering and routing merge near-repeats across frames. A kept video token keeps
its (t, h, w) position, t scaled by the video's seconds per frame pair as Qwen's own code
does. Qwen3-VL and Qwen3.5 write a video as one run per frame with timestamps between, so
their videos still pass through unreduced.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property

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
from vllm.multimodal.video_prune.evs import compute_retention_mask
from vllm.utils.import_utils import resolve_obj_by_qualname

from ..dispatch import reduce_per_image
from ..positions import grid_offsets, place_rows, position_columns, reduced_prompt_positions
from ..settings import ParSettingError, ParSettings
from ..worker import WORKER_CLS, ParWorker
from .base import FIELDS, Layout, ParModel, ParMultiModalProcessor, ParProcessingInfo, ParRequestError


class ParQwenProcessingInfo(ParProcessingInfo):
    def image_layout(self, width: int, height: int) -> Layout:
        # For the request metrics of images the processor has not seen; placeholders are
        # counted from the processor's own image_grid_thw (processed_layouts).
        return Layout(self.get_num_image_tokens(image_width=width, image_height=height,
                                                image_processor=self.get_image_processor(), mm_kwargs={}))


class ParQwenMultiModalProcessor(ParMultiModalProcessor):
    def processed_layouts(self, processed_data: BatchFeature, modality: str = "image") -> list[Layout] | None:
        grids = processed_data.get(f"{modality}_grid_thw")
        if grids is None:
            return None
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        layouts = [Layout(int(grid.prod()) // merge**2) for grid in grids]
        if modality == "video":
            for layout in layouts:
                if layout.full > self.max_video_tokens:
                    # Reduced, a long clip's K placeholders fit the context, but the vision
                    # encoder still runs on all N of its tokens, beyond what vLLM profiled
                    # its memory for.
                    raise VLLMValidationError(
                        f"this video is {layout.full} visual tokens before PAR reduces it; the server takes "
                        f"at most {self.max_video_tokens} per video (what vLLM sized the vision encoder's "
                        "memory for): send fewer frames or smaller ones", parameter="video")
        return layouts

    @cached_property
    def max_video_tokens(self) -> int:
        info = self.info
        # As vLLM's encoder budget asks it (vllm/multimodal/encoder_budget.py).
        active = {modality: 1 for modality, limit in info.allowed_mm_limits.items() if limit > 0}
        return info.get_mm_max_tokens_per_item(seq_len=info.ctx.model_config.max_model_len, mm_counts=active)["video"]

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


class ParQwen2_5_VLVideoProcessor(ParQwenMultiModalProcessor):
    """Qwen2.5-VL: videos reduced too, by PAR or, for comparison, by vLLM's own EVS."""

    reduced_modalities = ("image", "video")

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        settings = self.info.resolved_settings(hf_processor_mm_kwargs)
        if settings.method != "evs" or settings.reduces_nothing:
            return processed_data
        # apply() has refused images with EVS; here each video's first frame must fit in K.
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        for frames, height, width in processed_data.get("video_grid_thw", torch.empty(0, 3)).tolist():
            per_frame, full = height * width // merge**2, frames * height * width // merge**2
            if settings.num_kept(full) < per_frame:
                raise ParRequestError(ParSettingError(
                    f"par_keep_ratio: EVS keeps every token of a video's first frame, {per_frame} of this "
                    f"video's {full}, and these settings keep {settings.num_kept(full)}: ask for at least "
                    f"{per_frame} (a ratio of {per_frame / full:.3f}) or use another par_method",
                    setting="par_num_tokens" if settings.num_tokens is not None else "par_keep_ratio"))
        return processed_data


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
            keys = FIELDS.get(feature.modality)
            if keys is None or keys.layout not in (feature.data or {}):
                continue
            full = Layout.unpack(feature.data[keys.layout].data).full
            if feature.mm_position.length < full:
                span = ParSettings.from_tensor(feature.data[keys.settings].data).positions == "span"
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
        # N is each item's own row count here: the layouts are not needed.
        fields = {modality: (kwargs.pop(keys.query, None), kwargs.pop(keys.settings, None),
                             kwargs.pop(keys.layout, None)) for modality, keys in FIELDS.items()}
        rows = []
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            query_ids, packed_settings, _ = fields["image" if modality == "image" else "video"]
            if modality == "image":
                features = list(self._process_image_input(inputs))
                grids = [(1, h, w, 1.0) for _, h, w in inputs["image_grid_thw"].tolist()]
            else:
                features = list(self._process_video_input(inputs))
                grids = [(t, h, w, step) for (t, h, w), step in
                         zip(inputs["video_grid_thw"].tolist(), self._time_steps(inputs))]
            rows += self._reduce(features, grids, packed_settings, query_ids)
        return tuple(rows)

    def _time_steps(self, video_inputs) -> list[float]:
        """Per video, the M-RoPE t step from one frame pair to the next, as Qwen2.5-VL's own
        placement computes it (seconds per frame pair x the config's tokens per second)."""
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = video_inputs.get("second_per_grid_ts")
        count = len(video_inputs["video_grid_thw"])
        return [s * per_second for s in (seconds.tolist() if seconds is not None else [1.0] * count)]

    def _reduce(self, features, grids, packed_settings, query_ids) -> list[torch.Tensor]:
        """Each image's or video's rows, reduced, with the position columns place_rows reads.
        `grids`: (frames, height, width, t step) per item, height and width in patches."""
        if packed_settings is None:  # start-up profiling's dummy items, or videos left whole
            return [torch.cat([f, position_columns(None, len(f), f)], dim=1) for f in features]
        settings = [ParSettings.from_tensor(row) for row in packed_settings]
        merge = self.config.vision_config.spatial_merge_size
        if any(setting.method == "evs" for setting in settings):
            return [self._reduce_by_evs(f, grid, setting) if setting.method == "evs" else
                    self._reduce([f], [grid], setting.to_tensor()[None], [query])[0]
                    for f, grid, setting, query in zip(features, grids, settings, query_ids)]
        reduced = reduce_per_image(
            features, list(query_ids), settings, embed_tokens=self.get_language_model().embed_input_ids,
            on_batch=self._count_batch, on_kernel_failure=self._count_kernel_failure,
            score_dims=self.par_score_dims, with_kept=True,
            # Pooling reads the grid (PAR does not): a video's frames stacked.
            grids=[(frames * height // merge, width // merge) for frames, height, width, _ in grids])
        return [self._with_positions(tokens, kept, len(feature), grid, setting)
                for (tokens, kept), feature, grid, setting in zip(reduced, features, grids, settings)]

    def _reduce_by_evs(self, feature: torch.Tensor, grid, setting: ParSettings) -> torch.Tensor:
        """A video's K rows chosen by vLLM's own EVS (what --video-pruning-rate runs), at the
        rate that keeps exactly K (the processor made sure K covers the first frame)."""
        frames, height, width, _ = grid
        merge = self.config.vision_config.spatial_merge_size
        num_kept = setting.num_kept(len(feature))
        mask = compute_retention_mask(feature, (frames, height, width), merge, q=1 - (num_kept + 0.5) / len(feature))
        kept = mask.nonzero().flatten()
        return self._with_positions(feature[kept], kept, len(feature), grid, setting)

    def _with_positions(self, tokens, kept, num_full: int, grid, setting: ParSettings) -> torch.Tensor:
        """An item's kept rows with the position columns place_rows reads: each row's grid
        offset where the item is reduced and its tokens keep their own positions."""
        frames, height, width, step = grid
        merge = self.config.vision_config.spatial_merge_size
        placed = len(tokens) < num_full and setting.positions == "span"
        offsets = grid_offsets(height // merge, width // merge, frames, step)[kept.cpu()] if placed else None
        return torch.cat([tokens, position_columns(offsets, len(tokens), tokens)], dim=1)

    @property
    def par_score_dims(self) -> int | None:
        # Qwen3-VL's rows carry deepstack features beside the main embedding: PAR scores the
        # main embedding and the deepstack columns follow.
        return self.visual_dim if getattr(self, "deepstack_num_level", 0) else None


class ParQwen2_5_VLProcessingInfo(ParQwenProcessingInfo, Qwen2_5_VLProcessingInfo):
    pass


class ParQwen2_5_VLMultiModalProcessor(ParQwen2_5_VLVideoProcessor, Qwen2_5_VLMultiModalProcessor):
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
