"""Where a reduced image's tokens sit in the language model's positions (par_positions)."""

import pytest
import torch
from transformers import LlamaConfig

from par_vllm.positions import ROPE_OVERRIDES, image_positions, size_mrope_section, span_offsets


@pytest.mark.parametrize("full", [1, 9, 144, 576])
@pytest.mark.parametrize("share", [0.01, 0.06, 0.111, 0.5, 1.0])
def test_span_spreads_k_distinct_positions_over_the_whole_image(full, share):
    kept = max(1, round(full * share))
    offsets = span_offsets(kept, full)
    assert offsets[0] == 0 and offsets[-1] < full
    assert torch.all(offsets[1:] > offsets[:-1])
    gaps = offsets[1:] - offsets[:-1]
    assert gaps.numel() == 0 or gaps.max() - gaps.min() <= 1  # evenly spread
    if kept == full:
        assert torch.equal(offsets, torch.arange(full))


def test_text_after_a_spanned_image_starts_where_it_would_unreduced():
    # 2 text tokens, an image of N=16 reduced to K=4, 6 text tokens.
    positions, delta = image_positions(12, [(2, 4, 16, True)])
    assert positions.shape == (3, 12) and torch.equal(positions[0], positions[2])
    assert positions[0].tolist() == [0, 1, 2, 6, 10, 14, 18, 19, 20, 21, 22, 23]
    assert delta == 12  # generated token i (prompt index 12 + i) sits at 24 + i


def test_consecutive_images_and_unreduced_images_get_plain_positions():
    for images in ([(2, 4, 16, False)], [(2, 16, 16, True)], []):
        length = 2 + (images[0][1] if images else 0) + 6
        positions, delta = image_positions(length, images)
        assert positions[0].tolist() == list(range(length)) and delta == 0


def test_each_image_of_a_prompt_shifts_everything_after_it():
    # image A: N=16, K=4 spanned at 1; image B: N=9, K=3 consecutive at 6; image C: N=9, K=3 spanned at 10.
    positions, delta = image_positions(14, [(10, 3, 9, True), (1, 4, 16, True), (6, 3, 9, False)])
    assert positions[0].tolist() == [0, 1, 5, 9, 13, 17, 18, 19, 20, 21, 22, 25, 28, 31]
    assert delta == 12 + 6


def test_mrope_section_is_sized_to_the_head_and_refuses_other_rope_types():
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 1e5,
                              **ROPE_OVERRIDES["text_config"]["rope_parameters"]}
    size_mrope_section(config)
    assert sum(config.rope_parameters["mrope_section"]) == 32 and len(config.rope_parameters["mrope_section"]) == 3
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 1e5, "mrope_section": [1, 0, 0]}
    with pytest.raises(ValueError, match="llama3"):
        size_mrope_section(config)
