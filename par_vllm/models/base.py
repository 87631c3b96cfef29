"""PAR's glue to vLLM, for every model family: mixins placed before vLLM's own classes.

- ParProcessingInfo: resolves PAR settings (server defaults from the HF config's `par_*`
  keys, per-request overrides from `mm_processor_kwargs`, every key checked), rewrites
  prompts, and says how many placeholders an image reserves.
- ParMultiModalProcessor: folds the rewritten prompt and the settings into the processor
  kwargs, which vLLM hashes into every image's identity (processor cache, encoder cache,
  prefix-cache block hashes); reserves the reduced count of placeholders; ships the
  prompt's token ids, the settings and the image's layout to the model as per-image fields.
- ParModel: runs the family's vision tower and projector, then PAR on the visual rows,
  returning exactly the reserved count of rows per image; with `par_positions="span"`,
  places each image's rows over the N positions the whole image would take
  (par_vllm/positions.py), through vLLM's M-RoPE interface.

A family supplies its image layout: how many rows its model emits for an image (N), and
which of them are separators rather than visual tokens (LLaVA-NeXT's row-end
`image_newline`), from the processor's own outputs (`Layout`, `image_layout`,
`processed_layouts`). A family whose model reduces videos too lists "video" in its
processor's `reduced_modalities`: each video is then one item with its own K, under the
same settings as an image.
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, partial

import torch
from transformers import BatchFeature
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.rotary_embedding.mrope import MRotaryEmbedding
from vllm.multimodal.inputs import (
    MultiModalBatchedField,
    MultiModalFeatureSpec,
    MultiModalFieldConfig,
    MultiModalFieldElem,
    MultiModalKwargsItems,
)
from vllm.multimodal.parse import (
    ImageEmbeddingItems,
    ImageProcessorItems,
    MultiModalDataItems,
    VideoEmbeddingItems,
    VideoProcessorItems,
)
from vllm.multimodal.processing import PromptReplacement, PromptUpdate, PromptUpdateDetails
from vllm.platforms import current_platform

from .. import metrics
from ..dispatch import reduce_per_image
from ..feature_cache import FeatureCache, content_key, pack_key
from ..positions import ROPE_OVERRIDES, declares_positions, image_positions, size_mrope_section
from ..prompt import QueryRewriter, SecondView
from ..reduction import check_backend
from ..settings import PREFIX, ParSettingError, ParSettings, settings_from_hf_config

# The methods that select a video's tokens only, and how.
VIDEO_METHODS = {"evs": "vLLM's EVS compares each frame with the one before", "frames": "it drops whole frames"}
# Keys the processor adds to the mm processor kwargs after validating the request's.
# vLLM hashes these kwargs into each image's cache identity.
SETTINGS_KEY = "par_settings"
QUERY_KEY = "par_query_ids"
# Per-image field: the image's Layout, packed (for the reduction and its positions).
LAYOUT_KEY = "par_layout"
# Per-image field: the image's identity as stock vLLM computes it (its content and the
# request's other processor kwargs, not PAR's), the feature cache's key.
CONTENT_KEY = "par_content"


@dataclass(frozen=True)
class FieldKeys:
    """The per-item fields the processor ships to the model for one modality: vLLM batches
    a field by one modality, so a video's fields need keys of their own."""

    query: str
    settings: str
    layout: str
    content: str


FIELDS = {"image": FieldKeys(QUERY_KEY, SETTINGS_KEY, LAYOUT_KEY, CONTENT_KEY),
          "video": FieldKeys("par_video_query_ids", "par_video_settings", "par_video_layout", "par_video_content")}
_UNSET = object()
# Videos whose N the metrics remember (see _full_sizes): far more than vLLM's processor
# cache holds at its default size.
_SEEN_SIZES = 65536

# Under vLLM's "vllm" logger, whose handler and level vLLM configures.
logger = init_logger("vllm.plugins." + __name__)


@dataclass(frozen=True)
class Layout:
    """The rows a model emits for one image: `full` in all (N), of which the last of every
    one of `rows` tile-grid rows (each `row_width` visual tokens long) is a separator, and
    everything before the grid a visual token (LLaVA-NeXT's base view). Without a grid
    (`rows` 0) every row is a visual token."""

    full: int
    rows: int = 0
    row_width: int = 0

    @property
    def num_visual(self) -> int:
        return self.full - self.rows

    def visual_mask(self) -> torch.Tensor:
        mask = torch.ones(self.full, dtype=torch.bool)
        grid_start = self.full - self.rows * (self.row_width + 1)
        mask[grid_start + self.row_width::self.row_width + 1] = False
        return mask

    def placeholders(self, settings: ParSettings) -> int:
        """Rows reserved for the image: all N when nothing is removed; otherwise the K kept
        visual tokens and, for an image with separators, one separator after them."""
        kept = settings.num_kept(self.num_visual)
        if kept >= self.num_visual:
            return self.full
        return kept + (1 if self.rows else 0)

    def pack(self) -> torch.Tensor:
        return torch.tensor([self.full, self.rows, self.row_width])

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> Layout:
        return cls(*(int(x) for x in packed.tolist()))


class ParRequestError(VLLMValidationError, ParSettingError):
    """A bad PAR setting in a request: vLLM answers 400 and names the parameter."""

    def __init__(self, error: ParSettingError):
        super().__init__(str(error), parameter=f"mm_processor_kwargs.{error.setting}")
        self.setting = error.setting


class ParProcessingInfo:
    """Mixed in before a family's vLLM ProcessingInfo."""

    @cached_property
    def server_settings(self) -> ParSettings:
        return settings_from_hf_config(self.get_hf_config())

    def request_settings(self, request_kwargs: Mapping[str, object]) -> ParSettings:
        """A request's settings from its mm_processor_kwargs, on top of the server's.

        Every key is checked here, in the API server, before anything reaches the engine:
        a bad value, a server setting, an unknown `par_` key, or a key of the image
        processor's the operator has not allowed is a ParRequestError (HTTP 400)."""
        try:
            self.check_processor_keys(request_kwargs)
            settings = ParSettings.from_keys(request_kwargs, base=self.server_settings, request=True)
            if settings.positions == "span" and not self.places_tokens:
                raise positions_error()
            return settings.with_positions(self.places_tokens)
        except ParSettingError as error:
            raise ParRequestError(error) from None

    def check_processor_keys(self, request_kwargs: Mapping[str, object]) -> None:
        allowed = self.server_settings.allowed_request_kwargs
        configured = self.ctx.model_config.get_multimodal_config().mm_processor_kwargs or {}
        for key, value in request_kwargs.items():
            if key.startswith(PREFIX) or key in allowed or configured.get(key, _UNSET) == value:
                continue
            raise ParSettingError(
                f"{key}: not a PAR setting; this server takes only par_* keys in mm_processor_kwargs "
                "(its operator can allow others with par_allowed_request_kwargs)", setting=key)

    @staticmethod
    def resolved_settings(mm_kwargs: Mapping[str, object]) -> ParSettings:
        """The settings apply() resolved and put into the processor kwargs."""
        return ParSettings(**mm_kwargs[SETTINGS_KEY])

    @cached_property
    def places_tokens(self) -> bool:
        return declares_positions(self.get_hf_config())

    @cached_property
    def query_rewriter(self) -> QueryRewriter:
        processor = self.get_hf_processor()
        placeholders = [processor.image_token] + [t for t in [getattr(processor, "video_token", None)] if t]
        return QueryRewriter(self.get_tokenizer(), placeholders)

    def image_layout(self, width: int, height: int) -> Layout:
        """Family hook: the rows the model emits for an image of this original size."""
        return Layout(self.get_num_image_tokens(image_width=width, image_height=height))

    def second_view_prompt(self) -> str:
        """Family hook: the text an image takes at the start of a user message, where
        `query_turn="image_and_latest"` shows it again (vLLM's placeholder for a
        string-content template, and the newline vLLM writes after it)."""
        return self.get_hf_processor().image_token + "\n"

    @cached_property
    def second_view_prompt_ids(self) -> list[int]:
        return self.get_tokenizer().encode(self.second_view_prompt(), add_special_tokens=False)


class ParMultiModalProcessor:
    """Mixed in before a family's vLLM MultiModalProcessor."""

    info: ParProcessingInfo
    _profiling = False
    # What the family's model reduces; other modalities' placeholders stay the family's own.
    reduced_modalities: tuple[str, ...] = ("image",)

    def processed_layouts(self, processed_data: BatchFeature, modality: str = "image") -> list[Layout] | None:
        """Family hook: each image's (or video's) Layout from the HF processor's outputs
        (None when the request has none)."""
        raise NotImplementedError

    def apply(self, inputs, timing_ctx):
        request_kwargs = inputs.hf_processor_mm_kwargs
        settings = self.info.request_settings(request_kwargs)
        if settings.method in VIDEO_METHODS and not settings.reduces_nothing:
            self._check_video_method(settings.method, inputs.mm_data_items)
        check_videos(inputs.mm_data_items)
        rewrite = None if settings.reduces_nothing else self.info.query_rewriter.rewrite(
            inputs.prompt, settings.drop_question_type_words, settings.query_turn)
        query = () if rewrite is None else tuple(rewrite.query)
        kwargs = {k: v for k, v in request_kwargs.items() if not k.startswith(PREFIX)}
        content_keys = self._content_keys(replace(inputs, hf_processor_mm_kwargs=dict(kwargs)), settings)
        kwargs[SETTINGS_KEY] = {k: v for k, v in settings.request_fields().items() if v is not None}
        kwargs[QUERY_KEY] = query
        result = super().apply(replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)
        self._attach_content_keys(result, content_keys)
        # A modality sent as an empty list has nothing to count.
        counted = [m for m in self.reduced_modalities if result["mm_placeholders"].get(m)]
        if not self._profiling and counted:
            metrics.record_request(
                self.info.ctx.model_config.served_model_name,
                {modality: self._item_sizes(modality, inputs.mm_data_items, result) for modality in counted},
                disabled=settings.reduces_nothing,
                prompt_agnostic=not query,
            )
        if rewrite is not None:
            result = self._with_second_views(inputs, kwargs, rewrite.second_views, result, timing_ctx,
                                             content_keys)
        return result

    def _content_keys(self, stock_inputs, settings: ParSettings) -> dict[str, list[str]]:
        """Each reduced item's identity as stock vLLM would compute it (from `stock_inputs`,
        the request without PAR's kwargs): what the workers' feature cache keys it by. Empty
        where there is nothing to keep: the cache is off, nothing is reduced, or start-up
        profiling's dummy items."""
        if self._profiling or settings.reduces_nothing or not self.info.server_settings.feature_cache_mb:
            return {}
        items = MultiModalDataItems({m: v for m, v in stock_inputs.mm_data_items.items()
                                     if m in self.reduced_modalities})
        return self._get_mm_hashes(replace(stock_inputs, mm_data_items=items))

    def _attach_content_keys(self, result, content_keys: Mapping[str, Sequence[str]]) -> None:
        """Every item vLLM sends gets its content key field, empty where it has none, so that
        items of different requests batch. An item vLLM does not send (its engine already
        holds it from its processor cache) holds the field from when it was sent."""
        for modality in self.reduced_modalities:
            keys = content_keys.get(modality) or []
            for i, item in enumerate(result["mm_kwargs"].get(modality, ())):
                if item is not None:
                    item[FIELDS[modality].content] = MultiModalFieldElem(
                        data=pack_key(keys[i] if i < len(keys) else None),
                        field=MultiModalBatchedField(keep_on_cpu=True))

    def _with_second_views(self, inputs, kwargs: dict, views: Iterator[SecondView], result, timing_ctx,
                           content_keys: Mapping[str, Sequence[str]]):
        """`query_turn="image_and_latest"`: the earlier turns' images again, at the start of
        each later user message, each reduced against it. They are items of their own, with
        their own identity (processor, encoder and prefix caches), so the images where the
        client sent them keep theirs, and a view rebuilt for a turn the previous request
        already had is the same item: the prefix cache holds everything before the newest
        turn. The metrics count the images the client sent, not these."""
        first = next(views, None)
        images = inputs.mm_data_items.get("image")
        # Every view shows the same images: the first `first.images` of the prompt's.
        if first is None or not isinstance(images, ImageProcessorItems) or first.images > len(images):
            return result
        prompt = result["prompt_token_ids"]
        # The turns shown again come after the last image or video, so vLLM left their
        # tokens as they were: they are found from the end of the prompt.
        shift = len(prompt) - len(inputs.prompt)
        if prompt[first.at + shift:] != inputs.prompt[first.at:]:
            logger.warning("PAR: a later user turn was not where expected; no second view added")
            return result
        uuids = inputs.mm_uuid_items or {}
        # The views together hold at most as many tokens as the images they show have
        # unreduced (from about turn 1 + 1 / keep ratio on, later turns get none): a long
        # conversation's context never holds more of them than twice stock vLLM's. Which
        # turns get one depends only on the turns before, so each prompt still extends the
        # previous one.
        budget = sum(layout.full for layout in self._layouts(inputs.mm_data_items)[:first.images])
        merged_prompt, placeholders, hashes, items, done = [], [], [], [], 0
        for view in itertools.chain([first], views):
            shown = super().apply(replace(
                inputs,
                prompt=self.info.second_view_prompt_ids * view.images,
                mm_data_items=MultiModalDataItems({"image": ImageProcessorItems(images.data[:view.images])}),
                mm_uuid_items={"image": list(uuids["image"][:view.images])} if "image" in uuids else None,
                hf_processor_mm_kwargs={**kwargs, QUERY_KEY: tuple(view.query)},
            ), timing_ctx)
            # Never over the budget: a view shows its images at K <= N each, and the check
            # below stops before any view that would not fit.
            cost = sum(r.get_num_embeds() for r in shown["mm_placeholders"]["image"])
            budget -= cost
            # The same images: the feature cache holds the rows encoded for them.
            self._attach_content_keys(shown, {"image": list(content_keys.get("image", []))[:view.images]})
            merged_prompt += prompt[done:view.at + shift]
            placeholders += [replace(r, offset=r.offset + len(merged_prompt)) for r in shown["mm_placeholders"]["image"]]
            merged_prompt += shown["prompt_token_ids"]
            hashes += shown["mm_hashes"]["image"]
            items += shown["mm_kwargs"]["image"]
            done = view.at + shift
            # Each view costs the same (the same images, the same settings): with no room
            # for another, the turns after this one are not read at all.
            if cost > budget:
                break
        merged = dict(result)
        merged["prompt_token_ids"] = merged_prompt + prompt[done:]
        merged["mm_placeholders"] = {**result["mm_placeholders"],
                                     "image": [*result["mm_placeholders"]["image"], *placeholders]}
        merged["mm_hashes"] = {**result["mm_hashes"], "image": [*result["mm_hashes"]["image"], *hashes]}
        merged["mm_kwargs"] = MultiModalKwargsItems({**result["mm_kwargs"],
                                                     "image": [*result["mm_kwargs"]["image"], *items]})
        return merged

    def _check_video_method(self, method: str, mm_items: MultiModalDataItems) -> None:
        """par_method="evs" (vLLM's own video pruning, which compares each frame with the one
        before) and "frames" (frame dropping) select a video's tokens, never an image's."""
        if "video" not in self.reduced_modalities:
            problem = "this model's PAR reduces no videos"
        elif "image" in mm_items:
            problem = "this request has an image: send images with another method"
        else:
            return
        raise ParRequestError(ParSettingError(
            f"par_method: {method!r} selects video tokens ({VIDEO_METHODS[method]}) and {problem}",
            setting="par_method"))

    def _item_sizes(self, modality: str, mm_items: MultiModalDataItems, result) -> tuple[list[int], list[int]]:
        """Each item's N and K, for the metrics. An image's N comes from its size; a video's
        from the layout the processor packed, remembered by the item's hash for requests that
        reuse it from vLLM's processor cache (which then hands back no fields)."""
        kept = [r.get_num_embeds() for r in result["mm_placeholders"][modality]]
        if modality == "image":
            return [layout.full for layout in self._layouts(mm_items)], kept
        items = result["mm_kwargs"][modality]
        hashes = (result.get("mm_hashes") or {}).get(modality) or [None] * len(items)
        full = []
        for item, mm_hash, k in zip(items, hashes, kept):
            if item is not None:
                n = Layout.unpack(item[FIELDS[modality].layout].data).full
                if mm_hash is not None:
                    self._seen_sizes[mm_hash] = n
            else:  # one the metrics no longer remember counts as served whole: never fail for a metric
                n = self._seen_sizes.get(mm_hash, k)
            if mm_hash in self._seen_sizes:
                self._seen_sizes.move_to_end(mm_hash)
            full.append(n)
        while len(self._seen_sizes) > _SEEN_SIZES:
            self._seen_sizes.popitem(last=False)
        return full, kept

    @cached_property
    def _seen_sizes(self) -> OrderedDict[str, int]:
        return OrderedDict()

    def get_dummy_mm_inputs(self, *args, **kwargs):
        # Start-up profiling and warm-up process dummy images: keep them out of the metrics.
        self._profiling = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            self._profiling = False

    def _layouts(self, mm_items: MultiModalDataItems) -> list[Layout]:
        images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
        if isinstance(images, ImageEmbeddingItems):
            return [Layout(images.get_feature_size(i)) for i in range(len(images))]
        sizes = [images.get_image_size(i) for i in range(len(images))]
        return [self.info.image_layout(s.width, s.height) for s in sizes]

    def _call_hf_processor(self, hf_data, hf_kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in (SETTINGS_KEY, QUERY_KEY)}
        try:
            return super()._call_hf_processor(hf_data, hf_kwargs)
        except ValueError as error:
            # vLLM's message names the processor and echoes the data, not why it refused;
            # the processor's own reason (Qwen's: an image's aspect ratio over 200) is what
            # a client can act on.
            reason = error.__cause__
            if not isinstance(reason, ValueError):
                raise
            media = [name[:-1] for name in ("images", "videos") if name in hf_data]
            # With images and videos both sent, the reason does not say which one it was.
            parameter = "prompt" if not media else media[0] if len(media) == 1 else None
            raise VLLMValidationError(
                f"the model's processor refused this request's {' and '.join(media) or 'input'}: {reason}",
                parameter=parameter) from error

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        # Every image and video of a request is scored against the same prompt. The field is
        # always present (empty for image-only prompts) so items of different requests batch.
        query = torch.tensor(hf_processor_mm_kwargs.get(QUERY_KEY, ()), dtype=torch.long)
        packed = self.info.resolved_settings(hf_processor_mm_kwargs).to_tensor()
        for modality in self.reduced_modalities:
            layouts = self.processed_layouts(processed_data, modality)
            if layouts is None:
                continue
            keys = FIELDS[modality]
            processed_data[keys.query] = [query] * len(layouts)
            processed_data[keys.settings] = packed.expand(len(layouts), -1).clone()
            processed_data[keys.layout] = torch.stack([layout.pack() for layout in layouts])
        return processed_data

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for modality in self.reduced_modalities:
            keys = FIELDS[modality]
            fields[keys.query] = MultiModalFieldConfig.batched(modality)
            fields[keys.settings] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
            fields[keys.layout] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        settings = self.info.resolved_settings(hf_processor_mm_kwargs)
        layouts: list[Layout] = []

        def item_layout(modality: str, item_idx: int) -> Layout:
            # The layout the processor packed for the item; asked only for the items
            # mm_items holds (those not already cached).
            key = FIELDS[modality].layout
            item = out_mm_kwargs[modality][item_idx] if modality in out_mm_kwargs else None
            if item is not None and key in item:
                return Layout.unpack(item[key].data)
            if modality != "image":
                raise ValueError(f"the processor packed no layout for {modality} {item_idx}")
            if not layouts:
                layouts.extend(self._layouts(mm_items))
            return layouts[item_idx]

        def reduced(full: PromptReplacement, item_idx: int):
            return reserve(full.replacement(item_idx), item_layout(full.modality, item_idx).placeholders(settings))

        return [PromptReplacement(modality=update.modality, target=update.target,
                                  replacement=partial(reduced, update))
                if update.modality in self.reduced_modalities else update
                for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)]


def reserve(replacement, num_kept: int):
    """An item's placeholders with K of its embedding tokens: the first K of a plain run; in
    a replacement that has other tokens between its embedding tokens (Qwen3-VL's video: a
    timestamp and a <|vision_start|> ... <|vision_end|> run per frame), all K in the first
    run and every other token kept, as vLLM's own EVS lays out a pruned Qwen3-VL video. The
    model fills the K with one item's rows, in one piece."""
    if not isinstance(replacement, PromptUpdateDetails):
        return replacement[:num_kept]
    tokens = list(replacement.full)
    embeds = [True] * len(tokens) if replacement.is_embed is None else replacement.is_embed(tokens).tolist()
    if sum(embeds) <= num_kept:
        return replacement
    first = embeds.index(True)
    kept = tokens[:first] + [tokens[first]] * num_kept + [t for t, e in zip(tokens, embeds) if not e][first:]
    return PromptUpdateDetails.select_token_id(kept, tokens[first])


class ParModel:
    """Mixed in before a family's vLLM model class (which must also declare SupportsMRoPE)."""

    # Family hook: whether the language model's own RoPE is 1-D, so that the M-RoPE positions
    # this plugin gives it always come as three identical rows (LLaVA's families).
    one_row_rope = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        # Fail at start-up, naming the key, if --hf-overrides holds a bad default.
        server_settings = settings_from_hf_config(config)
        check_backend(server_settings.backend, current_platform.device_type)
        places_tokens = self.prepare_positions(vllm_config, server_settings)
        log_defaults(server_settings, places_tokens)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.par_model_name = vllm_config.model_config.served_model_name
        # The visual tokens' worth of items vLLM sized the tower's memory for (tower_groups).
        self.par_encoder_budget = vllm_config.scheduler_config.max_num_encoder_input_tokens
        self.par_feature_cache = FeatureCache(server_settings.feature_cache_mb * 2**20)
        self.par_first_row_only = places_tokens and self.one_row_rope and self._rope_back(config.get_text_config())
        if self.par_first_row_only:
            logger.info("PAR: positions come through vLLM's M-RoPE as three identical rows; the language "
                        "model runs its own RoPE on the first")

    def _rope_back(self, text_config) -> bool:
        """Give the language model back its own RoPE where vLLM built M-RoPE for it; whether
        it did. M-RoPE on three identical rows is that RoPE on one, and vLLM's CPU build runs
        M-RoPE op by op where it runs RoPE as one fused op, on every layer at every step;
        forward then hands the language model the first row."""
        rope = {k: v for k, v in text_config.rope_parameters.items() if k not in ("mrope_section", "mrope_interleaved")}
        swapped = False
        for module in self.get_language_model().modules():
            current = getattr(module, "rotary_emb", None)
            if isinstance(current, MRotaryEmbedding):
                module.rotary_emb = get_rope(current.head_size, current.max_position_embeddings,
                                             current.is_neox_style, rope, current.dtype)
                swapped = True
        return swapped

    def forward(self, input_ids, positions, *args, **kwargs):
        if self.par_first_row_only and positions.ndim == 2:
            positions = positions[0]
        return super().forward(input_ids, positions, *args, **kwargs)

    @staticmethod
    def prepare_positions(vllm_config, server_settings: ParSettings) -> bool:
        """Family hook, before the language model is built: whether the server can place
        kept tokens (`par_positions="span"`); raises ParSettingError where the settings ask
        for what the config cannot give. LLaVA's language models have 1-D RoPE, run as
        M-RoPE with three identical rows where the server's overrides name a section."""
        config = vllm_config.model_config.hf_config
        if declares_positions(config):
            try:
                size_mrope_section(config.get_text_config())
            except ValueError as error:
                raise ParSettingError(f"par_positions: {error}; serve without "
                                      "the text_config.rope_parameters.mrope_section override, "
                                      "with par_positions='consecutive'", setting="par_positions") from None
            return True
        if server_settings.positions == "span":
            raise positions_error()
        return False

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """vLLM asks once per request, before any image is encoded: only the reserved rows,
        N and the settings are needed, not which tokens PAR will keep."""
        images = []
        for feature in mm_features:
            if feature.modality != "image":
                continue
            assert feature.data is not None, "vLLM hands the model every image's fields"
            settings = ParSettings.from_tensor(feature.data[SETTINGS_KEY].data)
            full = Layout.unpack(feature.data[LAYOUT_KEY].data).full
            images.append((feature.mm_position.offset, feature.mm_position.length, full,
                           settings.positions == "span"))
        return image_positions(len(input_tokens), images)

    def embed_multimodal(self, **kwargs: object):
        query_ids = kwargs.pop(QUERY_KEY, None)
        packed_settings = kwargs.pop(SETTINGS_KEY, None)
        packed_layouts = kwargs.pop(LAYOUT_KEY, None)
        packed_keys = kwargs.pop(CONTENT_KEY, None)
        if packed_settings is None:
            return super().embed_multimodal(**kwargs)
        layouts = [Layout.unpack(row) for row in packed_layouts]
        settings = [ParSettings.from_tensor(row) for row in packed_settings]
        # Each field of these families holds one entry per image, so a run's are a slice.
        per_item = all(_one_per_item(value, len(layouts)) for value in kwargs.values())
        rows = []
        for items, features in self.encoded_runs(
                "image", [layout.full for layout in layouts], packed_keys, per_item,
                lambda items: super(ParModel, self).embed_multimodal(
                    **({k: v[items] for k, v in kwargs.items()} if items != slice(0, len(layouts)) else kwargs))):
            rows += reduce_images(
                features, layouts[items], settings[items], list(query_ids[items]),
                embed_tokens=self.get_language_model().embed_input_ids,
                on_batch=self._count_batch,
                on_kernel_failure=self._count_kernel_failure,
            )
        return rows

    def encoded_runs(self, modality: str, sizes: list[int], packed_keys, per_item: bool, encode):
        """Runs of items (a slice each) with their unreduced rows: from the feature cache
        for the items it holds, from `encode(items)` (the family's tower) for the rest, in
        runs whose summed N stays within vLLM's encoder budget (one item at least). vLLM's
        scheduler counts an item's encoder work by its K placeholders, but the tower runs on
        all N of it, so one step may hand over up to N / K times the tokens vLLM profiled the
        tower's memory for; the caller reduces each run's rows before the next run is
        encoded. Where the fields cannot be split per item (`per_item` False), one run."""
        keys = [content_key(packed) for packed in packed_keys] if packed_keys is not None else [None] * len(sizes)
        cache = self.par_feature_cache
        for items, hit in encoder_runs(sizes, [key in cache for key in keys], self.par_encoder_budget, per_item):
            # Fetched run by run, so that only one run's rows are on the device at a time; an
            # item an earlier run's rows pushed out of the cache is encoded after all.
            features = [cache.get(key, self.par_device) for key in keys[items]] if hit else [None]
            if any(rows is None for rows in features):
                features = list(encode(items))
                for key, rows in zip(keys[items], features):
                    cache.put(key, rows)
                hit = False
            self._count_cache_lookups(modality, keys[items], hit)
            yield items, features

    @cached_property
    def par_device(self) -> torch.device:
        return next(self.parameters()).device

    def _count_batch(self, images: int, implementation: str) -> None:
        metrics.engine_batches.labels(model_name=self.par_model_name, implementation=implementation).inc()

    def _count_kernel_failure(self, error: Exception) -> None:
        metrics.kernel_fallbacks.labels(model_name=self.par_model_name).inc()

    def _count_cache_lookups(self, modality: str, keys: list, hit: bool) -> None:
        looked_up = sum(key is not None for key in keys)
        if looked_up:
            metrics.feature_cache_lookups.labels(model_name=self.par_model_name, modality=modality,
                                                 result="hit" if hit else "miss").inc(looked_up)


def _one_per_item(value: object, count: int) -> bool:
    try:
        return len(value) == count
    except TypeError:  # None, a number, a 0-d tensor
        return False


def encoder_runs(sizes: list[int], cached: list[bool], budget: int, per_item: bool = True) -> list[tuple[slice, bool]]:
    """The items (their N in `sizes`) in runs, each answered by the feature cache (True:
    consecutive items it holds) or by the tower (False: consecutive items it does not
    hold), either kind grouped by tower_groups. Where items cannot be split (`per_item`
    False), one run of them all, answered by the cache only if it holds every one."""
    if not per_item:
        return [(slice(0, len(sizes)), bool(cached) and all(cached))]
    runs, start = [], 0
    while start < len(sizes):
        stop = start + 1
        while stop < len(sizes) and cached[stop] == cached[start]:
            stop += 1
        runs += [(slice(start + g.start, start + g.stop), cached[start]) for g in tower_groups(sizes[start:stop], budget)]
        start = stop
    return runs


def tower_groups(sizes: list[int], budget: int) -> list[slice]:
    """Consecutive runs of items (their N in `sizes`) whose summed N stays within `budget`,
    one item at least per run."""
    groups, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            groups.append(slice(start, i))
            start, total = i, 0
        total += size
    return groups + [slice(start, len(sizes))]


def reduce_images(
    features: list[torch.Tensor], layouts: list[Layout], settings: list[ParSettings],
    query_ids: list[torch.Tensor], embed_tokens, **callbacks,
) -> list[torch.Tensor]:
    """Each image's rows (N x D, as its family's model emits them) to the rows reserved for
    it: PAR on the visual rows only, then, for an image with separators, one of them."""
    masks = [layout.visual_mask().to(feature.device) for layout, feature in zip(layouts, features)]
    reduced = reduce_per_image([feature[mask] for feature, mask in zip(features, masks)], query_ids, settings,
                               embed_tokens=embed_tokens, **callbacks)
    out = []
    for feature, mask, layout, setting, visual in zip(features, masks, layouts, settings, reduced):
        if layout.placeholders(setting) == layout.full:
            out.append(feature)  # nothing removed: the model's own rows, separators and all
        elif layout.rows:
            out.append(torch.cat([visual, feature[~mask][-1:]]))  # one separator after the image
        else:
            out.append(visual)
    return out


def check_videos(mm_items: MultiModalDataItems) -> None:
    """A clip with no frames is the client's error, answered 400: vLLM's own processor would
    fail on it later with an error that reads as the server's. vLLM's loader also hands back
    none for a clip it could not decode a frame of (vLLM 0.32's OpenCV decoder reads no frame
    of a one-frame MP4)."""
    if "video" not in mm_items:
        return
    videos = mm_items.get_items("video", (VideoEmbeddingItems, VideoProcessorItems))
    if isinstance(videos, VideoProcessorItems):
        for i in range(len(videos)):
            frames = videos.get(i)  # None: a video the client named only by its uuid, cached
            if isinstance(frames, tuple):  # (frames, metadata), as Qwen's processors take them
                frames = frames[0]
            if frames is not None and len(frames) == 0:
                raise VLLMValidationError(f"video {i} has no frames that vLLM's video loader could decode",
                                          parameter="video")


def log_defaults(settings: ParSettings, places_tokens: bool) -> None:
    """One start-up line: the default budget, and where kept tokens sit (par_positions="auto"
    made concrete)."""
    if not settings.enabled:
        budget = "off by default (par_enabled=false)"
    elif settings.num_tokens is not None:
        budget = f"K = par_num_tokens={settings.num_tokens} per image by default"
    else:
        budget = f"K = ceil(N x par_keep_ratio={settings.keep_ratio}) per image by default"
    positions = settings.with_positions(places_tokens).positions
    hint = ""
    if positions == "consecutive" and settings.positions == "auto":
        hint = (f" (add {json.dumps(ROPE_OVERRIDES)} to --hf-overrides, as par-vllm serve does, to place "
                "them over the whole image's positions)")
    logger.info("PAR: %s; kept tokens at %s positions%s", budget, positions, hint)


def positions_error() -> ParSettingError:
    return ParSettingError(
        "par_positions: 'span' places each image's kept tokens through vLLM's M-RoPE positions, which "
        f"this server's config does not switch on: add {json.dumps(ROPE_OVERRIDES)} to --hf-overrides "
        "(`par-vllm serve` does) or set par_positions to 'consecutive'", setting="par_positions")
