"""LLaVA with PAR: vLLM's LLaVA, reserving K placeholders per image instead of N.

- ProcessingInfo: resolves PAR settings (server defaults from the HF config's `par_*`
  keys, per-request overrides from `mm_processor_kwargs`) and rewrites prompts.
- MultiModalProcessor: folds the rewritten prompt and the settings into the processor
  kwargs, which vLLM hashes into every image's identity (processor cache, encoder cache,
  prefix-cache block hashes); reserves K placeholders; ships the prompt's token ids and
  the settings to the model as per-image fields.
- Model: runs the usual vision tower and projector, then PAR, returning K rows per image;
  with `par_positions="span"`, places each image's K tokens over the N positions the
  whole image would take (par_vllm/positions.py), through vLLM's M-RoPE interface.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property

import torch
from transformers import BatchFeature
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.platforms import current_platform

from .. import metrics
from ..settings import PREFIX, ParSettingError, ParSettings, settings_from_hf_config
from ..positions import ROPE_OVERRIDES, declares_positions, image_positions, size_mrope_section
from ..prompt import QueryRewriter
from ..dispatch import reduce_per_image
from ..reduction import check_backend

# Keys the processor adds to the mm processor kwargs after validating the request's.
# vLLM hashes these kwargs into each image's cache identity.
SETTINGS_KEY = "par_settings"
QUERY_KEY = "par_query_ids"
# Per-image field: N, the image's visual tokens before reduction (for its positions).
FULL_KEY = "par_full_tokens"
_UNSET = object()

# Under vLLM's "vllm" logger, whose handler and level vLLM configures.
logger = init_logger("vllm.plugins." + __name__)


class ParRequestError(VLLMValidationError, ParSettingError):
    """A bad PAR setting in a request: vLLM answers 400 and names the parameter."""

    def __init__(self, error: ParSettingError):
        super().__init__(str(error), parameter=f"mm_processor_kwargs.{error.setting}")
        self.setting = error.setting


class ParLlavaProcessingInfo(LlavaProcessingInfo):
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
        return QueryRewriter(self.get_tokenizer(), self.get_hf_processor().image_token)


class ParLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    info: ParLlavaProcessingInfo
    _profiling = False

    def apply(self, inputs, timing_ctx):
        request_kwargs = inputs.hf_processor_mm_kwargs
        settings = self.info.request_settings(request_kwargs)
        query = () if settings.reduces_nothing else tuple(
            self.info.query_rewriter(inputs.prompt, settings.drop_question_type_words))
        kwargs = {k: v for k, v in request_kwargs.items() if not k.startswith(PREFIX)}
        kwargs[SETTINGS_KEY] = {k: v for k, v in settings.request_fields().items() if v is not None}
        kwargs[QUERY_KEY] = query
        result = super().apply(replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)
        if not self._profiling and "image" in inputs.mm_data_items:
            metrics.record_request(
                self.info.ctx.model_config.served_model_name,
                full=self._full_token_counts(inputs.mm_data_items),
                kept=[r.get_num_embeds() for r in result["mm_placeholders"]["image"]],
                disabled=settings.reduces_nothing,
                prompt_agnostic=not query,
            )
        return result

    def get_dummy_mm_inputs(self, *args, **kwargs):
        # Start-up profiling and warm-up process dummy images: keep them out of the metrics.
        self._profiling = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            self._profiling = False

    def _full_token_counts(self, mm_items: MultiModalDataItems) -> list[int]:
        images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
        if isinstance(images, ImageEmbeddingItems):
            return [images.get_feature_size(i) for i in range(len(images))]
        sizes = [images.get_image_size(i) for i in range(len(images))]
        return [self.info.get_num_image_tokens(image_width=s.width, image_height=s.height) for s in sizes]

    def _call_hf_processor(self, hf_data, hf_kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in (SETTINGS_KEY, QUERY_KEY)}
        return super()._call_hf_processor(hf_data, hf_kwargs)

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed_data = super()._postprocess_hf_mm_data(
            mm_inputs, hf_processor_mm_kwargs, processed_data
        )
        images = processed_data.get("pixel_values", processed_data.get("image_embeds"))
        if images is None:
            return processed_data
        # Every image of a request is scored against the same prompt. The field is always
        # present (empty for image-only prompts) so items of different requests batch.
        query = torch.tensor(hf_processor_mm_kwargs.get(QUERY_KEY, ()), dtype=torch.long)
        packed = self.info.resolved_settings(hf_processor_mm_kwargs).to_tensor()
        processed_data[QUERY_KEY] = [query] * len(images)
        processed_data[SETTINGS_KEY] = packed.expand(len(images), -1).clone()
        processed_data[FULL_KEY] = torch.tensor([self._full_tokens(image) for image in images])
        return processed_data

    def _full_tokens(self, image: torch.Tensor) -> int:
        if image.ndim == 2:  # image embeddings: N x hidden
            return image.shape[0]
        height, width = image.shape[-2:]
        return self.info.get_num_image_tokens(image_width=width, image_height=height)

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            QUERY_KEY: MultiModalFieldConfig.batched("image"),
            SETTINGS_KEY: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            FULL_KEY: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        settings = self.info.resolved_settings(hf_processor_mm_kwargs)
        (full,) = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)

        def reduced(item_idx: int) -> list[int]:
            placeholders = full.replacement(item_idx)
            return placeholders[: settings.num_kept(len(placeholders))]

        return [PromptReplacement(modality=full.modality, target=full.target, replacement=reduced)]


@MULTIMODAL_REGISTRY.register_processor(
    ParLlavaMultiModalProcessor,
    info=ParLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ParLlavaForConditionalGeneration(LlavaForConditionalGeneration, SupportsMRoPE):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        # Fail at start-up, naming the key, if --hf-overrides holds a bad default.
        server_settings = settings_from_hf_config(config)
        check_backend(server_settings.backend, current_platform.device_type)
        places_tokens = declares_positions(config)
        if places_tokens:
            try:
                size_mrope_section(config.get_text_config())  # before the language model is built
            except ValueError as error:
                raise ParSettingError(f"par_positions: {error}; serve without "
                                      "the text_config.rope_parameters.mrope_section override, "
                                      "with par_positions='consecutive'", setting="par_positions") from None
        elif server_settings.positions == "span":
            raise positions_error()
        log_defaults(server_settings, places_tokens)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.par_model_name = vllm_config.model_config.served_model_name

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """vLLM asks once per request, before any image is encoded: only K, N and the
        settings are needed, not which tokens PAR will keep."""
        images = []
        for feature in mm_features:
            if feature.modality != "image":
                continue
            assert feature.data is not None, "vLLM hands the model every image's fields"
            settings = ParSettings.from_tensor(feature.data[SETTINGS_KEY].data)
            full = int(feature.data[FULL_KEY].data)
            images.append((feature.mm_position.offset, feature.mm_position.length, full,
                           settings.positions == "span"))
        return image_positions(len(input_tokens), images)

    def embed_multimodal(self, **kwargs: object):
        query_ids = kwargs.pop(QUERY_KEY, None)
        packed_settings = kwargs.pop(SETTINGS_KEY, None)
        kwargs.pop(FULL_KEY, None)
        features = super().embed_multimodal(**kwargs)
        if packed_settings is None or len(features) == 0:
            return features
        settings = [ParSettings.from_tensor(row) for row in packed_settings]
        return reduce_per_image(
            list(features),
            list(query_ids),
            settings,
            embed_tokens=self.get_language_model().embed_input_ids,
            on_batch=self._count_batch,
            on_kernel_failure=self._count_kernel_failure,
        )

    def _count_batch(self, images: int, implementation: str) -> None:
        metrics.engine_batches.labels(model_name=self.par_model_name, implementation=implementation).inc()

    def _count_kernel_failure(self, error: Exception) -> None:
        metrics.kernel_fallbacks.labels(model_name=self.par_model_name).inc()


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
