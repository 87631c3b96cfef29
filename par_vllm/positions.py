"""Where a reduced image sits in the language model's positions.

The language model was trained with every image spanning N positions. Handed K tokens at K
consecutive positions, it sees a smaller image, and the prompt after it closer than it
ever was in training. `par_positions="span"` keeps the full image's geometry instead: the
K tokens spread evenly over the N positions the image would have taken (token i at
i * N // K), and the text after the image starts where it would have without reduction
(what it gained on the accuracy benchmark: docs/how-it-works.md).

vLLM gives a model per-request positions through its M-RoPE interface, which the engine
switches on when the text config's `rope_parameters` name an `mrope_section`. Fed three
identical position rows, M-RoPE is exactly the model's ordinary RoPE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MROPE_ROWS = 3


def span_offsets(num_kept: int, num_full: int) -> torch.Tensor:
    """Positions, relative to the image's first, of `num_kept` tokens spread over `num_full`."""
    return torch.arange(num_kept) * num_full // num_kept


def image_positions(
    num_prompt_tokens: int, images: Sequence[tuple[int, int, int, bool]]
) -> tuple[torch.Tensor, int]:
    """Positions (MROPE_ROWS x T, identical rows) of a prompt whose images are
    (placeholder offset, K placeholders, N full tokens, span) in prompt order, and the
    delta vLLM adds to the positions of generated tokens (their index plus delta)."""
    positions = torch.empty(num_prompt_tokens, dtype=torch.long)
    text_from, shift = 0, 0  # shift: positions gained over the prompt index so far
    for offset, kept, full, span in sorted(images):
        positions[text_from:offset] = torch.arange(text_from, offset) + shift
        at = offset + shift
        if span:
            positions[offset:offset + kept] = at + span_offsets(kept, full)
            shift += full - kept
        else:
            positions[offset:offset + kept] = torch.arange(at, at + kept)
        text_from = offset + kept
    positions[text_from:] = torch.arange(text_from, num_prompt_tokens) + shift
    return positions.expand(MROPE_ROWS, -1).clone(), shift


# What --hf-overrides adds (`par_overrides`, `par-vllm serve`): vLLM merges it into the
# checkpoint's own rope_parameters. Any section switches M-RoPE on; the model sizes it to
# its head when it loads (`size_mrope_section`), so the override needs no knowledge of
# the checkpoint and a serve command can be written before its config is at hand.
ROPE_OVERRIDES = {"text_config": {"rope_parameters": {"mrope_section": [1, 0, 0]}}}


def size_mrope_section(text_config) -> None:
    """Make the text config's M-RoPE section fit its rotary dimension (vLLM requires the
    section to sum to half of it). Raises ValueError for RoPE variants that vLLM does not
    run as M-RoPE."""
    rope = text_config.rope_parameters
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"this checkpoint's rope_type is {kind!r}; only plain RoPE runs as M-RoPE")
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    half = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
    # The three rows are identical, so how the frequencies split among them does not matter.
    rope["mrope_section"] = [half - 2 * (half // 4), half // 4, half // 4]


def declares_positions(hf_config: object) -> bool:
    """Whether vLLM will ask this model for per-request positions (M-RoPE is on)."""
    from vllm.transformers_utils.config import uses_mrope

    return uses_mrope(hf_config)


# Qwen-VL: true (t, h, w) positions.
#
# Qwen2.5-VL and Qwen3-VL place an image's tokens on its grid: the token at merged row h,
# column w sits at (base, base + h, base + w), where base is one past the text before it,
# and the text after the image starts at base + max(H, W); a Qwen2.5-VL video's token in
# frame pair t at (base + floor(t x step), base + h, base + w); a Qwen3-VL video's frame
# pairs each sit on their own grid after their own timestamp's text, all K kept tokens in
# the first pair's run of placeholders (offsets from the video's first token then span
# the timestamps between). Which tokens PAR keeps is known
# only once the image is encoded, after vLLM has asked the model for the prompt's
# positions, so they are written in two steps:
# - up front (`reduced_prompt_positions`): everything but the kept tokens, exactly as the
#   family's own code places the unreduced prompt (text after a reduced image starts where
#   it would unreduced); the kept tokens get provisional positions;
# - when the kept tokens reach the language model (vLLM's multimodal-pruning interface,
#   `recompute_mrope_positions`): each row the model emits carries its own grid offset in
#   POSITION_COLUMNS extra columns, and `place_rows` writes base + offset at the prompt
#   index the row fills, or leaves the position as written where the row says so (an
#   image or video that was not reduced, kept tokens at consecutive positions).
# The position of a row therefore depends only on the row and on the text before its
# image, not on how the prompt was split into prefill chunks.

# Columns appended to each row: [recompute, t_hi, t_lo, h_hi, h_lo, w_hi, w_lo]. Offsets
# travel as two base-256 digits so that bfloat16 rows carry them exactly.
POSITION_COLUMNS = 7
_DIGIT = 256


def position_columns(offsets: torch.Tensor | None, num_rows: int, like: torch.Tensor) -> torch.Tensor:
    """The columns appended to `num_rows` rows of `like`'s dtype and device: grid offsets
    (rows x 3: t, h, w, relative to the image's first position) for rows to be placed,
    or None for rows whose up-front positions stand."""
    columns = torch.zeros(num_rows, POSITION_COLUMNS, dtype=like.dtype, device=like.device)
    if offsets is None:
        return columns
    offsets = offsets.to(like.device)
    if offsets.numel() and int(offsets.max()) >= _DIGIT * _DIGIT:
        raise ValueError("grid offsets above 65,535 cannot travel in the rows")
    columns[:, 0] = 1
    columns[:, 1::2] = (offsets // _DIGIT).to(like.dtype)
    columns[:, 2::2] = (offsets % _DIGIT).to(like.dtype)
    return columns


def grid_offsets(height: int, width: int, frames: int = 1, time_step: float = 1.0) -> torch.Tensor:
    """(t, h, w) offsets of an image's H x W merged tokens, or a video's T x H x W, in
    raster order (T*H*W x 3). A video's t offset is its frame pair's index times
    `time_step`, rounded toward zero as Qwen2.5-VL's own placement does."""
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    t = (t.to(torch.float64) * time_step).long()
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)


def place_rows(
    input_ids: Sequence[int] | torch.Tensor,
    rows: Sequence[torch.Tensor],
    positions: torch.Tensor,
    num_computed_tokens: int,
    placeholder_ids: Sequence[int],
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """The rows without their POSITION_COLUMNS, the prompt's positions (3 x T) with every
    row that asks for it placed, and vLLM's position delta.

    `rows` are the multimodal rows of this prefill step in prompt order; they fill the
    prompt's placeholder tokens (`placeholder_ids`) from the first one at or after
    `num_computed_tokens` on, whatever the chunk boundaries. A row's base is one past the
    highest position of the token before its run of placeholders."""
    device = positions.device
    ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids), device=device)
    stripped = [row[:, :-POSITION_COLUMNS] for row in rows]
    columns = torch.cat([row[:, -POSITION_COLUMNS:] for row in rows]) if rows else None
    positions = positions.clone()
    if columns is not None and len(columns):
        is_placeholder = torch.isin(ids, torch.tensor(list(placeholder_ids), device=device))
        indices = torch.nonzero(is_placeholder).flatten()
        targets = indices[indices >= num_computed_tokens][: len(columns)]
        if len(targets) != len(columns):
            raise ValueError(f"{len(columns)} multimodal rows for {len(targets)} placeholders after "
                             f"token {num_computed_tokens}")
        placed = columns[:, 0].to(device) > 0.5
        if bool(placed.any()):
            targets = targets[placed]
            digits = columns[placed, 1:].to(device).round().long()
            offsets = digits[:, 0::2] * _DIGIT + digits[:, 1::2]  # rows x 3
            # Start of each target's run of placeholders: the last non-placeholder before it, + 1.
            index = torch.arange(len(ids), device=device)
            last_text = torch.where(is_placeholder, torch.full_like(index, -1), index).cummax(0).values
            run_start = last_text[targets] + 1
            before = positions[:, (run_start - 1).clamp(min=0)].max(dim=0).values + 1
            base = torch.where(run_start > 0, before, torch.zeros_like(before))
            positions[:, targets] = (base[:, None] + offsets).T.to(positions.dtype)
    delta = int(positions.max()) + 1 - len(ids)
    return stripped, positions, delta


@dataclass(frozen=True)
class ReducedItem:
    """An image or video whose K is below its N, as its placeholders sit in the prompt.

    `tokens[offset:offset + length]` is its placeholder range; `full_tokens` the range it
    would have unreduced. Its `embed_id` tokens (K in the prompt, N unreduced) are one run
    in the prompt; its other tokens (Qwen3-VL's per-frame timestamps and vision markers)
    are the same in both, in order."""

    offset: int
    length: int
    full_tokens: Sequence[int]
    embed_id: int
    span: bool


def reduced_prompt_positions(
    input_tokens: Sequence[int],
    items: Sequence[ReducedItem],
    unreduced_positions,
) -> tuple[torch.Tensor, int]:
    """Up-front positions (3 x T) and delta of a prompt with reduced images or videos, from
    the family's own code for the unreduced prompt.

    `items` in prompt order. `unreduced_positions(tokens, expansions)` is the family's
    placement of the prompt with each item's range expanded back to its `full_tokens`
    (`expansions`: (offset in the expanded prompt, length) per item). Text, and the
    items' own non-embedding tokens, take exactly the positions they have there; a span
    item's K tokens get provisional ones (place_rows writes the real ones); a consecutive
    item's range sits at consecutive positions from its first, and everything after it
    moves up by what the item no longer spans."""
    tokens = list(input_tokens)
    expanded: list[int] = []
    expansions = []
    at = 0
    for item in items:
        expanded += tokens[at:item.offset]
        expansions.append((len(expanded), len(item.full_tokens)))
        expanded += list(item.full_tokens)
        at = item.offset + item.length
    expanded += tokens[at:]
    full_positions, _ = unreduced_positions(expanded, expansions)
    full_positions = torch.as_tensor(full_positions, dtype=torch.long)

    pieces, at, shift = [], 0, 0
    for item, (full_offset, full_length) in zip(items, expansions):
        text_from = full_offset - (item.offset - at)
        pieces.append(full_positions[:, text_from:full_offset] - shift)
        whole = full_positions[:, full_offset:full_offset + full_length]
        reduced = torch.tensor(tokens[item.offset:item.offset + item.length]) == item.embed_id
        if item.span:
            unreduced = torch.tensor(list(item.full_tokens)) == item.embed_id
            if int((~reduced).sum()) != int((~unreduced).sum()):
                raise ValueError("an item's tokens other than its placeholders differ from its unreduced ones")
            placed = torch.empty(MROPE_ROWS, item.length, dtype=torch.long)
            placed[:, ~reduced] = whole[:, ~unreduced]
            placed[:, reduced] = whole[:, unreduced][:, :int(reduced.sum())]
            pieces.append(placed - shift)
        else:
            first = int(whole[0, 0]) - shift
            pieces.append(torch.arange(first, first + item.length).expand(MROPE_ROWS, -1))
            shift += int(whole.max()) + 1 - (int(whole[0, 0]) + item.length)
        at = item.offset + item.length
    pieces.append(full_positions[:, len(full_positions[0]) - (len(tokens) - at):] - shift)
    positions = torch.cat(pieces, dim=1)
    return positions, int(positions.max()) + 1 - len(tokens)
