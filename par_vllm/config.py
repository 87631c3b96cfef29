"""PAR's settings: one validated pydantic model, and the key scheme users see.

Server defaults come from `par_`-prefixed keys in `--hf-overrides` (they land on
the HF config); a request overrides them with the same keys in vLLM's per-request
`mm_processor_kwargs`, except the server settings (SERVER_ONLY), which depend on the
machine or set the server's policy and which no request may change. Every key is the
field name with a `par_` prefix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PREFIX = "par_"
# The model sees settings only as per-image tensors (mm fields), so they travel packed
# in this order.
PACKED_FIELDS = ("enabled", "keep_ratio", "num_tokens", "outlier_factor", "retrieval_share",
                 "duplicate_threshold", "relevance", "knn_k", "backend", "method", "centres",
                 "drop_question_type_words", "similarity", "routing", "centre_relevance", "positions",
                 "min_retrieved")
CHOICES = {"relevance": ("max", "mean"), "backend": ("auto", "torch", "triton"),
           "method": ("par", "pool", "random", "topk", "diverse"),
           "centres": ("density_peaks", "farthest_point"), "similarity": ("cosine", "centred"),
           "routing": ("nearest", "separate"), "positions": ("span", "consecutive")}


def server_only(**kwargs) -> object:
    """A pydantic Field that requests may not change (listed in SERVER_ONLY)."""
    return Field(json_schema_extra={"server_only": True}, **kwargs)


class ParSettingError(ValueError):
    """A PAR setting has a bad value, a wrong type, or an unknown name.

    `setting` is the user-facing key (for example `par_keep_ratio`).
    """

    def __init__(self, message: str, *, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class ParSettings(BaseModel):
    # strict: "0.5" or True is a client bug, not a ratio; ints are fine for floats.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    enabled: bool = True
    # 0.111 of LLaVA-1.5's 576 tokens is 64, PAR's headline budget (89% compression).
    keep_ratio: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.111
    # An explicit per-image budget; wins over keep_ratio. Clamped to the image's N.
    num_tokens: Annotated[int, Field(ge=1)] | None = None
    # Retrieval keeps tokens with relevance > Q3 + outlier_factor * IQR (TRIM/PruMerge rule).
    outlier_factor: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.5
    # At most this share of the budget goes to retrieved tokens; clustering gets the rest.
    # Under routing="separate" at least one kept token is always a centre.
    retrieval_share: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.5
    # Retrieval takes at least this many of the most relevant tokens (within the same cap)
    # even when none is an outlier. A word the projector aligned weakly can leave no token
    # above Q3 + alpha * IQR although its best match is the object asked about; with nothing
    # retrieved, every kept token is a prompt-agnostic cluster centre. 0 is the paper's rule.
    min_retrieved: Annotated[int, Field(ge=0)] = 2
    # Tokens this similar (by `similarity`) to a retrieved token merge into it instead of
    # competing for a cluster centre.
    duplicate_threshold: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.9
    # How a visual token's similarities to the prompt's tokens reduce to one relevance.
    relevance: Literal["max", "mean"] = "max"
    # Prompt rewriting also drops the words that name the kind of answer asked for
    # ("color", "shape", "kind", "type": par_vllm.prompt.QUESTION_TYPE_WORDS), which match
    # every patch that has a colour or a shape, so that the words naming the object decide.
    drop_question_type_words: bool = True
    # Neighbours in the cosine kNN graph that estimates density for cluster centres.
    knn_k: Annotated[int, Field(ge=1, le=64)] = 5
    # How the tokens retrieval left are covered: "density_peaks" (DPC-KNN centres, the
    # densest regions first) or "farthest_point" (each centre the token farthest from
    # every token kept so far, retrieved ones included).
    centres: Literal["density_peaks", "farthest_point"] = "density_peaks"
    # How strongly the prompt steers the cluster centres: each candidate's centre score
    # (rho * delta, or its farthest-point distance) is multiplied by its relevance, rescaled
    # to [0, 1] within the image, to this power. 0 is the paper's prompt-agnostic
    # clustering; above 0, of two equally good centres the one nearer the prompt wins, so a
    # small budget covers the part of the image the prompt is about before the rest.
    centre_relevance: Annotated[float, Field(ge=0, le=16, allow_inf_nan=False)] = 0.0
    # How visual tokens are compared with each other (near-duplicates, cluster centres,
    # routing): "cosine", or "centred" (cosine after subtracting the image's mean token).
    # Projected tokens of one image can share one large direction (a mean pairwise cosine of
    # 0.89 on the accuracy benchmark's model), so plain cosine calls much of the image a
    # near-duplicate of whatever was retrieved; centring compares what tells tokens apart.
    similarity: Literal["cosine", "centred"] = "centred"
    # Where routing sends a token that is not a near-duplicate of a retrieved token:
    # "nearest" (its most similar kept token, retrieved or centre) or "separate" (its most
    # similar cluster centre), so retrieved tokens take in only their near-duplicates and
    # what the prompt asked about is not averaged with unrelated parts of the image.
    routing: Literal["nearest", "separate"] = "separate"
    # Where the K kept tokens sit in the language model's positions: "span" spreads them
    # over the N positions the whole image takes, and starts the text after the image where
    # it would start unreduced, as the model saw images in training; "consecutive" gives
    # them K positions, as any other K tokens. "span" needs vLLM's per-request positions
    # (par_vllm.positions.ROPE_OVERRIDES in --hf-overrides; `par-vllm serve` adds it).
    positions: Literal["span", "consecutive"] = "span"
    # Which implementation runs: "auto" uses the Triton kernels on CUDA tensors and the
    # torch reference elsewhere; "torch" forces the reference; "triton" forces the kernels
    # (on a CPU only under TRITON_INTERPRET=1). Server-only: whether the kernels can run
    # depends on the machine, and a request that forced them where they cannot would
    # fail inside the engine, for every request batched with it.
    backend: Annotated[Literal["auto", "torch", "triton"], server_only()] = "auto"
    # Keys other than PAR's that a request may send in mm_processor_kwargs. vLLM's
    # --trust-request-mm-kwargs, which per-request PAR settings need, hands every key to
    # the image processor, and some (a resize, a crop size) produce inputs the vision tower
    # cannot take; PAR refuses every non-PAR key a request sends unless it is listed here.
    allowed_request_kwargs: Annotated[tuple[str, ...], server_only(strict=False)] = ()
    # What selects the K tokens: PAR itself, or a baseline at the same budget, for
    # comparisons through the same server: "pool" (2D average pooling), "random",
    # "topk" (prompt relevance, no merging), "diverse" (prompt-agnostic max-min diversity,
    # DivPrune-style).
    method: Literal["par", "pool", "random", "topk", "diverse"] = "par"

    @field_validator("allowed_request_kwargs", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):  # the CLI flag and PAR_ALLOWED_REQUEST_KWARGS
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    def num_kept(self, num_tokens: int) -> int:
        """K for an image of `num_tokens` visual tokens (N when PAR is off)."""
        if not self.enabled:
            return num_tokens
        if self.num_tokens is not None:
            return min(self.num_tokens, num_tokens)
        return max(1, min(num_tokens, math.ceil(num_tokens * self.keep_ratio)))

    @property
    def reduces_nothing(self) -> bool:
        """True when every image is served whole, whatever its size."""
        return not self.enabled or (self.num_tokens is None and self.keep_ratio == 1.0)

    def to_keys(self) -> dict[str, object]:
        return {PREFIX + name: value for name, value in self.model_dump(mode="json").items()}

    def request_fields(self) -> dict[str, object]:
        """Every setting a request resolves to (what the processor hashes and packs)."""
        return self.model_dump(exclude=set(SERVER_ONLY) - set(PACKED_FIELDS))

    def to_tensor(self) -> torch.Tensor:
        values = self.model_dump()
        values["num_tokens"] = values["num_tokens"] or 0
        for name, choices in CHOICES.items():
            values[name] = choices.index(values[name])
        return torch.tensor([float(values[name]) for name in PACKED_FIELDS], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, packed: torch.Tensor) -> ParSettings:
        values = dict(zip(PACKED_FIELDS, packed.tolist()))
        return cls(
            enabled=bool(values["enabled"]),
            keep_ratio=values["keep_ratio"],
            num_tokens=int(values["num_tokens"]) or None,
            outlier_factor=values["outlier_factor"],
            retrieval_share=values["retrieval_share"],
            duplicate_threshold=values["duplicate_threshold"],
            relevance=CHOICES["relevance"][int(values["relevance"])],
            knn_k=int(values["knn_k"]),
            backend=CHOICES["backend"][int(values["backend"])],
            method=CHOICES["method"][int(values["method"])],
            centres=CHOICES["centres"][int(values["centres"])],
            drop_question_type_words=bool(values["drop_question_type_words"]),
            similarity=CHOICES["similarity"][int(values["similarity"])],
            routing=CHOICES["routing"][int(values["routing"])],
            centre_relevance=values["centre_relevance"],
            positions=CHOICES["positions"][int(values["positions"])],
            min_retrieved=int(values["min_retrieved"]),
        )

    @classmethod
    def from_keys(
        cls, keys: Mapping[str, object], base: ParSettings | None = None, request: bool = False
    ) -> ParSettings:
        """Settings from `par_*` keys (other keys are ignored), on top of `base`; with
        `request`, a server setting (SERVER_ONLY) is refused.

        Raises ParSettingError naming the first offending key.
        """
        overrides = {}
        for key, value in keys.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):]
            if name not in cls.model_fields:
                known = ", ".join(PREFIX + n for n in cls.model_fields if not request or n not in SERVER_ONLY)
                raise ParSettingError(f"{key}: unknown PAR setting (known: {known})", setting=key)
            if request and name in SERVER_ONLY:
                current = getattr(base or cls(), name)
                raise ParSettingError(
                    f"{key}: a server setting, which requests may not change (this server: {current!r}); "
                    f"set it when the server starts", setting=key)
            overrides[name] = value
        values = {**(base.model_dump() if base else {}), **overrides}
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            setting = PREFIX + str(error["loc"][0]) if error["loc"] else "par_settings"
            raise ParSettingError(
                f"{setting}: {error['msg']} (got {error.get('input')!r})", setting=setting
            ) from None


SERVER_ONLY = frozenset(name for name, field in ParSettings.model_fields.items()
                        if (field.json_schema_extra or {}).get("server_only"))


def settings_from_hf_config(hf_config: object) -> ParSettings:
    """Server defaults: the `par_*` attributes that `--hf-overrides` put on the HF config."""
    keys = {k: v for k, v in vars(hf_config).items() if k.startswith(PREFIX)}
    return ParSettings.from_keys(keys)
