"""PAR's settings, each declared once: its field, type, default, bounds, description, group
and whether requests may change it.

Everything else derives from these declarations: the per-image tensor the model receives
(`to_tensor` / `from_tensor`), the `par-vllm serve` flags and their `PAR_*` environment
variables (`par_vllm.cli`), and the settings reference (`docs/settings.md`, written by
`par-vllm settings --markdown`; a test checks it is current).

Server defaults come from `par_`-prefixed keys in `--hf-overrides` (they land on the HF
config); a request overrides them with the same keys in vLLM's per-request
`mm_processor_kwargs`, except the server settings, which no request may change.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PREFIX = "par_"
# Groups, in the order the reference lists them.
USER, EXPERT, SERVER = "user", "expert", "server"
GROUPS = {USER: "Settings a user changes", EXPERT: "Tuning (experts)",
          SERVER: "Server settings (requests may not change them)"}


def setting(description: str, *, group: str = EXPERT, experimental: str | None = None,
            off_flag: str | None = None, per_image: bool = True, **bounds) -> object:
    """A field's declaration. `experimental` names what was measured against it;
    `off_flag` is the CLI flag that sets a boolean to false (instead of --no-NAME);
    `per_image=False` for a setting the workers read once at start-up, which then does not
    travel with every image (nor enter its identity)."""
    extra = {"group": group, "experimental": experimental, "off_flag": off_flag, "per_image": per_image}
    return Field(description=description, json_schema_extra=extra, **bounds)


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

    enabled: Annotated[bool, setting(
        "Reduce images at all; false serves every image whole, exactly as vLLM's own model.",
        group=USER, off_flag="disable")] = True
    keep_ratio: Annotated[float, setting(
        "Share of each image's (and each Qwen-VL video's) N visual tokens to keep: K = "
        "ceil(N x ratio), at least 1 (LLaVA-NeXT's row separators are not visual tokens). 0.111 "
        "keeps 64 of LLaVA-1.5's 576.", group=USER, gt=0, le=1, allow_inf_nan=False)] = 0.111
    num_tokens: Annotated[int | None, setting(
        "An explicit K per image (and per video), clamped to its N; wins over keep_ratio.",
        group=USER, ge=1)] = None
    method: Annotated[Literal["par", "pool", "random", "topk", "diverse", "evs", "frames"], setting(
        "What selects the K tokens: PAR, or a baseline at the same budget for comparisons "
        "through the same server: pool (2D average pooling), random, topk (prompt relevance, "
        "no merging), diverse (prompt-agnostic max-min diversity, DivPrune-style); for Qwen-VL "
        "videos only, evs (vLLM's own Efficient Video Sampling, the tokens that changed most "
        "from the previous frame, every token of the first frame kept, so K must be at least "
        "one frame's tokens) and frames (uniform frame dropping: evenly spaced frames, whole, "
        "and evenly spaced tokens within them where K is not a whole number of frames).",
        group=USER)] = "par"
    positions: Annotated[Literal["auto", "span", "consecutive"], setting(
        "Where the K kept tokens sit among the language model's positions: span keeps them "
        "within the whole image's positions (Qwen-VL: each at its own (t, h, w); LLaVA: spread "
        "evenly over the N positions) and the text after the image starts where it would "
        "unreduced; consecutive gives them K positions; auto is span where the server has "
        "vLLM's per-request positions switched on (par-vllm serve does; Qwen-VL always), "
        "consecutive otherwise.", group=USER)] = "auto"

    outlier_factor: Annotated[float, setting(
        "Retrieval keeps tokens whose prompt relevance exceeds Q3 + factor x IQR.",
        ge=0, allow_inf_nan=False)] = 1.5
    retrieval_share: Annotated[float, setting(
        "At most this share of K goes to retrieved tokens; clustering gets the rest. Under "
        "routing=separate at least one kept token is always a cluster centre.",
        ge=0, le=1, allow_inf_nan=False)] = 0.5
    min_retrieved: Annotated[int, setting(
        "Retrieval takes at least this many of the most relevant tokens, outliers or not, "
        "within the same cap; 0 is the paper's rule (outliers only).", ge=0)] = 2
    duplicate_threshold: Annotated[float, setting(
        "Tokens more similar than this (by `similarity`) to a retrieved token merge into it "
        "instead of competing for a cluster centre.", gt=0, le=1, allow_inf_nan=False)] = 0.9
    relevance: Annotated[Literal["max", "mean"], setting(
        "How a visual token's similarities to the prompt's words reduce to one relevance.")] = "max"
    query_turn: Annotated[Literal["image", "latest", "image_and_latest"], setting(
        "Which user words of a conversation the images are scored against: latest, the last "
        "user turn (the image follows the conversation, with a new prefill of the reduced "
        "image every turn); image, those of the user turns that carry an image (later turns "
        "leave the reduced image unchanged, so vLLM's prefix cache is reused, but a later "
        "question about another part of the image finds less of it kept); image_and_latest, "
        "as image, and each later question that brings no image of its own is shown the "
        "earlier images again at its turn, each reduced to its own K against that question, "
        "and keeps that view in the turns after it (each turn's prompt extends the previous "
        "one's, so the prefix cache holds all of it; each later turn prefills its views' K "
        "tokens, and the conversation's context grows by them, up to as many as the images "
        "have unreduced: later turns get none). System prompts and assistant turns never "
        "count.")] = "image_and_latest"
    drop_question_type_words: Annotated[bool, setting(
        "Prompt rewriting also drops the words that name the kind of answer asked for "
        "(color, shape, kind, type, ...), which match every patch with a colour or a shape, so "
        "the words naming the object decide.", off_flag="keep-question-type-words")] = True
    knn_k: Annotated[int, setting(
        "Neighbours in the kNN graph whose density ranks cluster centres.", ge=1, le=64)] = 5
    similarity: Annotated[Literal["centred", "cosine"], setting(
        "How visual tokens are compared with each other (near-duplicates, centres, routing): "
        "centred is the cosine after subtracting the image's mean token, so a direction every "
        "token shares does not make them all look alike; cosine is the paper's.")] = "centred"
    routing: Annotated[Literal["separate", "nearest"], setting(
        "separate: a retrieved token takes in only its near-duplicates, every other token goes "
        "to its most similar cluster centre; nearest (the paper's): every token goes to its "
        "most similar kept token.")] = "separate"
    centres: Annotated[Literal["density_peaks", "farthest_point"], setting(
        "How the tokens retrieval left are covered: density_peaks (DPC-KNN, the paper's) or "
        "farthest_point (each centre the token farthest from everything kept so far).",
        experimental="farthest_point")] = "density_peaks"
    centre_relevance: Annotated[float, setting(
        "How strongly the prompt steers cluster centres: each centre's score times its "
        "relevance (rescaled to [0, 1] within the image) to this power; 0 is the paper's "
        "prompt-agnostic clustering.", experimental="any value above 0",
        ge=0, le=16, allow_inf_nan=False)] = 0.0
    merge_repeats: Annotated[bool, setting(
        "Videos: a token more similar than duplicate_threshold (by `similarity`) to the token at "
        "its place one frame pair before merges into it first, and PAR's steps compare only "
        "the distinct tokens, whose number, not N, their cost grows with; where K or fewer "
        "are distinct, the repeats that changed most are kept too. Images are unaffected.")] = True

    backend: Annotated[Literal["auto", "torch", "triton"], setting(
        "auto: the Triton kernels on CUDA tensors, the torch reference elsewhere; torch or "
        "triton forces one (triton on a CPU only under TRITON_INTERPRET=1). Whether kernels can "
        "run depends on the machine, so no request may choose.", group=SERVER)] = "auto"
    allowed_request_kwargs: Annotated[tuple[str, ...], setting(
        "Keys other than PAR's that a request may send in mm_processor_kwargs (comma-separated "
        "or a list); any other is refused with a 400. Some image processor keys (a resize, a "
        "crop size) make inputs the vision tower cannot take.", group=SERVER, strict=False)] = ()
    feature_cache_mb: Annotated[int, setting(
        "Host memory (MiB, per worker) for the vision tower's unreduced output of recent images "
        "and videos, kept by their content: a later request that sends the same one under "
        "another question (a later turn of a conversation under query_turn latest or "
        "image_and_latest) is reduced from it without running the tower again, where vLLM's "
        "own caches, which key an item by its query too, would miss. 0 turns it off.",
        group=SERVER, per_image=False, ge=0)] = 512

    @field_validator("allowed_request_kwargs", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):  # a CLI flag or an environment variable
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    def num_kept(self, num_visual: int) -> int:
        """K for an image of `num_visual` (N) visual tokens; N when PAR is off."""
        if not self.enabled:
            return num_visual
        if self.num_tokens is not None:
            return min(self.num_tokens, num_visual)
        return max(1, min(num_visual, math.ceil(num_visual * self.keep_ratio)))

    @property
    def reduces_nothing(self) -> bool:
        """True when every image is served whole, whatever its size."""
        return not self.enabled or (self.num_tokens is None and self.keep_ratio == 1.0)

    def with_positions(self, places_tokens: bool) -> ParSettings:
        """`positions="auto"` made concrete for a server that can (or cannot) place tokens."""
        if self.positions != "auto":
            return self
        return self.model_copy(update={"positions": "span" if places_tokens else "consecutive"})

    def to_keys(self) -> dict[str, object]:
        return {PREFIX + name: value for name, value in self.model_dump(mode="json").items()}

    def request_fields(self) -> dict[str, object]:
        """What a request resolves to, as the processor hashes it into each image's identity."""
        return self.model_dump(include=set(PACKED))

    def to_tensor(self) -> torch.Tensor:
        """The model sees settings only as per-image tensors (mm fields): one float each."""
        values = []
        for name in PACKED:
            value, kind = getattr(self, name), FIELD_TYPES[name]
            if isinstance(kind, tuple):  # a choice: its index
                value = kind.index(value)
            values.append(0.0 if value is None else float(value))
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, packed: torch.Tensor) -> ParSettings:
        values = {}
        for name, number in zip(PACKED, packed.tolist()):
            kind = FIELD_TYPES[name]
            if isinstance(kind, tuple):
                values[name] = kind[int(number)]
            elif kind is int:
                values[name] = int(number) or (None if name in OPTIONAL else 0)
            else:
                values[name] = kind(number)
        return cls(**values)

    @classmethod
    def from_keys(
        cls, keys: Mapping[str, object], base: ParSettings | None = None, request: bool = False
    ) -> ParSettings:
        """Settings from `par_*` keys (other keys are ignored), on top of `base`; with
        `request`, a server setting is refused.

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


def _field_type(annotation) -> object:
    """bool, int, float or str, or the tuple of choices of a Literal (Optional unwrapped)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return tuple
    return annotation


def extra(name: str) -> dict:
    return ParSettings.model_fields[name].json_schema_extra


FIELD_TYPES = {name: _field_type(field.annotation) for name, field in ParSettings.model_fields.items()}
CHOICES = {name: kind for name, kind in FIELD_TYPES.items() if isinstance(kind, tuple) and kind is not tuple}
OPTIONAL = {name for name, field in ParSettings.model_fields.items() if field.default is None}
SERVER_ONLY = frozenset(name for name in ParSettings.model_fields if extra(name)["group"] == SERVER)
# Every per-image setting with one number's worth of value travels to the model; a list (the
# server's request policy) is read where the request arrives and goes no further.
PACKED = tuple(name for name, kind in FIELD_TYPES.items() if kind is not tuple and extra(name)["per_image"])


def settings_from_hf_config(hf_config: object) -> ParSettings:
    """Server defaults: the `par_*` attributes that `--hf-overrides` put on the HF config."""
    keys = {k: v for k, v in vars(hf_config).items() if k.startswith(PREFIX)}
    return ParSettings.from_keys(keys)
