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
