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

Videos are reduced too: each video is one item with its own K, scored against the same
prompt, and PAR's clustering and routing merge near-repeats across frames. A kept video
token keeps its (t, h, w) position: in Qwen2.5-VL t is its frame pair's index scaled by the
video's seconds per pair, as Qwen's own code does; Qwen3-VL and Qwen3.5 write a video as
one run per frame, each after its timestamp, and a kept token sits on its own frame's grid
after its own frame's timestamp. There the K placeholders all take the first frame's run,
the other frames keep their timestamps with empty runs, as vLLM's own EVS lays out a pruned
Qwen3-VL video.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property, partial

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
from vllm.multimodal.inputs import (
    MultiModalFeatureSpec,
    MultiModalFieldConfig,
    MultiModalFieldElem,
    MultiModalKwargsItem,
    PlaceholderRange,
)
from vllm.multimodal.video_prune.evs import compute_retention_mask
from vllm.utils.import_utils import resolve_obj_by_qualname

from ..baselines import uniform_frames
from ..dispatch import reduce_per_image
from ..positions import ReducedItem, grid_offsets, place_rows, position_columns, reduced_prompt_positions
from ..settings import ParSettingError, ParSettings
from ..worker import WORKER_CLS, ParWorker
from .base import (
    FIELDS,
    VIDEO_METHODS,
    Layout,
    ParModel,
    ParMultiModalProcessor,
    ParProcessingInfo,
    ParRequestError,
)


def evs_pruning_rate(num_kept: int, num_full: int) -> float:
    """The rate at which vLLM's EVS keeps exactly `num_kept` of a video's `num_full` tokens
    (it keeps the tokens whose score is above its q-quantile)."""
    return 1 - (num_kept + 0.5) / num_full


class ParQwenProcessingInfo(ParProcessingInfo):
    def image_layout(self, width: int, height: int) -> Layout:
        # For the request metrics of images the processor has not seen; placeholders are
        # counted from the processor's own image_grid_thw (processed_layouts).
        return Layout(self.get_num_image_tokens(image_width=width, image_height=height,
                                                image_processor=self.get_image_processor(), mm_kwargs={}))

    def second_view_prompt(self) -> str:
        # As Qwen's chat template writes an image part.
        return f"<|vision_start|>{self.get_hf_processor().image_token}<|vision_end|>"


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


class ParQwenVideoProcessor(ParQwenMultiModalProcessor):
    """Videos reduced too, by PAR or, for comparison, by vLLM's own EVS."""

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

    one_row_rope = False  # Qwen's own M-RoPE: (t, h, w) rows

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
            position = feature.mm_position
            if position.get_num_embeds() < full:
                span = ParSettings.from_tensor(feature.data[keys.settings].data).positions == "span"
                embed_id = self.config.image_token_id if feature.modality == "image" else self.config.video_token_id
                placeholders = input_tokens[position.offset:position.offset + position.length]
                reduced.append((feature, ReducedItem(position.offset, position.length,
                                                     self._unreduced_tokens(placeholders, embed_id, full, feature),
                                                     embed_id, span)))
        if not reduced:
            return family.get_mrope_input_positions(input_tokens, mm_features)

        def unreduced_positions(tokens, expansions):
            moved = {id(feature): (offset, length) for (feature, _), (offset, length) in zip(reduced, expansions)}
            features, grown = [], 0
            for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
                position = feature.mm_position
                if id(feature) in moved:
                    offset, length = moved[id(feature)]
                    placed = PlaceholderRange(offset=offset, length=length)
                else:
                    placed = replace(position, offset=position.offset + grown)
                grown = placed.offset + placed.length - position.offset - position.length
                features.append(replace(feature, mm_position=placed))
            return family.get_mrope_input_positions(tokens, features)

        return reduced_prompt_positions(input_tokens, [item for _, item in reduced], unreduced_positions)

    @staticmethod
    def _unreduced_tokens(placeholders: list[int], embed_id: int, num_full: int, feature) -> list[int]:
        """An item's placeholder range as it would be unreduced: N placeholders, or, for a
        video written one run per frame (Qwen3-VL), each frame's run whole again after its
        own <|vision_start|> (the token before the reduced run, which sits in the first
        frame's place)."""
        if all(token == embed_id for token in placeholders):
            return [embed_id] * num_full
        frames = int(feature.data["video_grid_thw"].data[0])
        marker = placeholders[placeholders.index(embed_id) - 1]
        text = [token for token in placeholders if token != embed_id]
        starts = [i for i, token in enumerate(text) if token == marker]
        if len(starts) != frames:
            raise ValueError(f"a video of {frames} frames has {len(starts)} frame runs in its placeholders")
        unreduced, at = [], 0
        for start in starts:
            unreduced += text[at:start + 1] + [embed_id] * (num_full // frames)
            at = start + 1
        return unreduced + text[at:]

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
                             kwargs.pop(keys.content, None), kwargs.pop(keys.layout, None))
                  for modality, keys in FIELDS.items()}
        rows = []
        merge = self.config.vision_config.spatial_merge_size
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            kind = "image" if modality == "image" else "video"
            query_ids, packed_settings, packed_keys, _ = fields[kind]
            if modality == "image":
                grids = [(1, h, w, partial(grid_offsets, h // merge, w // merge))
                         for _, h, w in inputs["image_grid_thw"].tolist()]
            else:
                grids = [(t, h, w, offsets) for (t, h, w), offsets in
                         zip(inputs["video_grid_thw"].tolist(), self._video_offsets(inputs))]
            sizes = (inputs[f"{modality}_grid_thw"].prod(-1) // merge**2).tolist()
            # Precomputed embeddings have no tower to skip; rows are packed, each item's grid
            # t x h x w of them (_items_of).
            towered = inputs["type"] in ("pixel_values", "pixel_values_videos")
            encode = partial(self._encode, modality, inputs)
            for items, features in self.encoded_runs(kind, sizes, packed_keys if towered else None, towered,
                                                     encode):
                rows += self._reduce(features, grids[items], packed_settings[items] if packed_settings is not None
                                     else None, query_ids[items] if query_ids is not None else None)
        return tuple(rows)

    def _encode(self, modality: str, inputs, items: slice) -> list[torch.Tensor]:
        process = self._process_image_input if modality == "image" else self._process_video_input
        return list(process(self._items_of(modality, inputs, items)))

    @staticmethod
    def _items_of(modality: str, inputs, items: slice) -> dict:
        """The tower's inputs for some of the items (pixel rows are packed, each item's
        grid t x h x w of them)."""
        grid_key, pixels_key = f"{modality}_grid_thw", ("pixel_values" if modality == "image" else
                                                        "pixel_values_videos")
        grids = inputs[grid_key]
        if inputs["type"] != pixels_key or (items.start == 0 and items.stop == len(grids)):
            return inputs
        rows = grids.prod(-1).cumsum(0).tolist()
        first, last = (rows[items.start - 1] if items.start else 0), rows[items.stop - 1]
        return {"type": inputs["type"], pixels_key: inputs[pixels_key][first:last], grid_key: grids[items]}

    def _video_offsets(self, video_inputs) -> list:
        """Per video, a function giving its N tokens' (t, h, w) offsets from its first token's
        position, as Qwen2.5-VL's own placement puts them: t is the frame pair's index times
        its seconds per pair times the config's tokens per second."""
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = video_inputs.get("second_per_grid_ts")
        grids = video_inputs["video_grid_thw"].tolist()
        seconds = seconds.tolist() if seconds is not None else [1.0] * len(grids)
        merge = self.config.vision_config.spatial_merge_size
        return [partial(grid_offsets, h // merge, w // merge, t, step * per_second)
                for (t, h, w), step in zip(grids, seconds)]

    def _reduce(self, features, grids, packed_settings, query_ids) -> list[torch.Tensor]:
        """Each image's or video's rows, reduced, with the position columns place_rows reads.
        `grids`: (frames, height, width, offsets) per item, height and width in patches,
        offsets() its N tokens' (t, h, w) offsets (what place_rows adds to the item's base)."""
        if packed_settings is None:  # start-up profiling's dummy items, or videos left whole
            return [torch.cat([f, position_columns(None, len(f), f)], dim=1) for f in features]
        settings = [ParSettings.from_tensor(row) for row in packed_settings]
        merge = self.config.vision_config.spatial_merge_size
        if any(setting.method in VIDEO_METHODS for setting in settings):
            return [self._reduce_video_by(setting.method, f, grid, setting) if setting.method in VIDEO_METHODS
                    else self._reduce([f], [grid], setting.to_tensor()[None], [query])[0]
                    for f, grid, setting, query in zip(features, grids, settings, query_ids)]
        reduced = reduce_per_image(
            features, list(query_ids), settings, embed_tokens=self.get_language_model().embed_input_ids,
            on_batch=self._count_batch, on_kernel_failure=self._count_kernel_failure,
            score_dims=self.par_score_dims, with_kept=True,
            # Pooling reads the grid (PAR does not): a video's frames stacked.
            grids=[(frames * height // merge, width // merge) for frames, height, width, _ in grids],
            steps=[frames for frames, _, _, _ in grids])
        return [self._with_positions(tokens, kept, len(feature), grid, setting)
                for (tokens, kept), feature, grid, setting in zip(reduced, features, grids, settings)]

    def _reduce_video_by(self, method: str, feature: torch.Tensor, grid, setting: ParSettings) -> torch.Tensor:
        """A video's K rows chosen by vLLM's own EVS (what --video-pruning-rate runs), at the
        rate that keeps exactly K (the processor made sure K covers the first frame), or by
        uniform frame dropping."""
        frames, height, width, _ = grid
        merge = self.config.vision_config.spatial_merge_size
        num_kept = setting.num_kept(len(feature))
        if method == "evs":
            mask = compute_retention_mask(feature, (frames, height, width), merge,
                                          q=evs_pruning_rate(num_kept, len(feature)))
            kept = mask.nonzero().flatten()
        else:
            kept = uniform_frames(frames, height * width // merge**2, num_kept).to(feature.device)
        return self._with_positions(feature[kept], kept, len(feature), grid, setting)

    def _with_positions(self, tokens, kept, num_full: int, grid, setting: ParSettings) -> torch.Tensor:
        """An item's kept rows with the position columns place_rows reads: each row's grid
        offset where the item is reduced and its tokens keep their own positions."""
        placed = len(tokens) < num_full and setting.positions == "span"
        offsets = grid[3]()[kept.cpu()] if placed else None
        return torch.cat([tokens, position_columns(offsets, len(tokens), tokens)], dim=1)

    @property
    def par_score_dims(self) -> int | None:
        # Qwen3-VL's rows carry deepstack features beside the main embedding: PAR scores the
        # main embedding and the deepstack columns follow.
        return self.visual_dim if getattr(self, "deepstack_num_level", 0) else None


class ParQwen2_5_VLProcessingInfo(ParQwenProcessingInfo, Qwen2_5_VLProcessingInfo):
    pass


class ParQwen2_5_VLMultiModalProcessor(ParQwenVideoProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ParQwen2_5_VLMultiModalProcessor,
    info=ParQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class ParQwen2_5_VLForConditionalGeneration(ParQwenModel, Qwen2_5_VLForConditionalGeneration):
    pass


class ParQwen3Model(ParQwenModel):
    """Qwen3-VL and Qwen3.5: a video is one run per frame, each after its timestamp."""

    def _video_offsets(self, video_inputs) -> list:
        timestamps = video_inputs["timestamps"]
        return [partial(self._frame_runs_offsets, t, h, w, stamps)
                for (t, h, w), stamps in zip(video_inputs["video_grid_thw"].tolist(), timestamps)]

    def _frame_runs_offsets(self, frames: int, height: int, width: int, timestamps) -> torch.Tensor:
        """A video's N tokens' (t, h, w) offsets from its first token's position, from the
        family's own placement of the video's unreduced placeholders (as vLLM's EVS for
        Qwen3-VL reads them): each frame's grid sits after its timestamp's text."""
        merge = self.config.vision_config.spatial_merge_size
        tokens = Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=[height * width // merge**2] * frames, timestamps=timestamps, tokenizer=self._tokenizer,
            vision_start_token_id=self.config.vision_start_token_id,
            vision_end_token_id=self.config.vision_end_token_id, video_token_id=self.config.video_token_id).full
        grid = MultiModalFieldElem(data=torch.tensor([frames, height, width]),
                                   field=MultiModalFieldConfig.batched("video").field)
        video = MultiModalFeatureSpec(data=MultiModalKwargsItem({"video_grid_thw": grid}), modality="video",
                                      identifier="par-offsets", mm_position=PlaceholderRange(0, len(tokens)))
        positions, _ = super(ParModel, self).get_mrope_input_positions(tokens, [video])
        positions = torch.as_tensor(positions)[:, torch.tensor(tokens) == self.config.video_token_id].T
        return positions - positions[0, 0]


class ParQwen3VLProcessingInfo(ParQwenProcessingInfo, Qwen3VLProcessingInfo):
    pass


class ParQwen3VLMultiModalProcessor(ParQwenVideoProcessor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ParQwen3VLMultiModalProcessor,
    info=ParQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ParQwen3VLForConditionalGeneration(ParQwen3Model, Qwen3VLForConditionalGeneration):
    pass


class ParQwen3_5ProcessingInfo(ParQwenProcessingInfo, Qwen3_5ProcessingInfo):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ParQwen3VLMultiModalProcessor,
    info=ParQwen3_5ProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ParQwen3_5ForConditionalGeneration(ParQwen3Model, Qwen3_5ForConditionalGeneration):
    pass
