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


# Qwen-VL: positions written up front, kept tokens placed as their rows arrive.
PAD, TEXT = 9, 1


def grid_positions(tokens, expansions):
    """A Qwen-style placement of an unreduced prompt whose images are (offset, H x W) runs
    of PAD: text at consecutive positions; an image at (base, base + h, base + w); the text
    after it from base + max(H, W). Each image here is 2 rows high."""
    positions, at, next_pos = [], 0, 0
    for offset, full in expansions:
        for _ in range(offset - at):
            positions.append([next_pos] * 3)
            next_pos += 1
        height, width = 2, full // 2
        positions += [[next_pos, next_pos + h, next_pos + w] for h in range(height) for w in range(width)]
        next_pos += max(height, width)
        at = offset + full
    for _ in range(len(tokens) - at):
        positions.append([next_pos] * 3)
        next_pos += 1
    positions = torch.tensor(positions).T
    return positions, int(positions.max()) + 1 - len(tokens)


def test_kept_rows_land_on_their_full_image_positions_whatever_the_chunks():
    from par_vllm.positions import ReducedItem, grid_offsets, place_rows, position_columns, reduced_prompt_positions

    # Two images of 2 x 6 and 2 x 3 tokens, keeping 4 and 2 of them; a third left whole.
    kept = [torch.tensor([1, 4, 7, 11]), torch.tensor([0, 5])]
    tokens = [TEXT] * 3 + [PAD] * 4 + [TEXT] * 2 + [PAD] * 2 + [TEXT] + [PAD] * 4 + [TEXT] * 3
    images = [ReducedItem(3, 4, [PAD] * 12, PAD, True), ReducedItem(9, 2, [PAD] * 6, PAD, True)]
    expanded = [TEXT] * 3 + [PAD] * 12 + [TEXT] * 2 + [PAD] * 6 + [TEXT] + [PAD] * 4 + [TEXT] * 3
    full, full_delta = grid_positions(expanded, [(3, 12), (17, 6), (24, 4)])
    up_front, delta = reduced_prompt_positions(tokens, images, lambda t, e: grid_positions(t, [*e, (24, 4)]))
    rows = [torch.cat([torch.randn(len(k), 5), position_columns(grid_offsets(2, n // 2)[k], len(k), torch.zeros(1))],
                      dim=1) for k, n in zip(kept, (12, 6))]
    rows.append(torch.cat([torch.randn(4, 5), position_columns(None, 4, torch.zeros(1))], dim=1))
    expected = torch.cat([full[:, :3], full[:, 3 + kept[0]], full[:, 15:17], full[:, 17 + kept[1]],
                          full[:, 23:]], dim=1)
    assert delta == full_delta + (12 - 4) + (6 - 2)
    flat = torch.cat(rows)
    pad_at = [i for i, t in enumerate(tokens) if t == PAD]
    for chunk in range(1, len(tokens) + 1):
        positions = up_front
        for start in range(0, len(tokens), chunk):
            # The rows of this chunk, split per image as vLLM hands them over.
            mine = [i for i in pad_at if start <= i < start + chunk]
            if not mine:
                continue
            first = pad_at.index(mine[0])
            owner = [0] * 4 + [1] * 2 + [2] * 4
            pieces = [flat[first:first + len(mine)][[owner[first + r] == o for r in range(len(mine))]]
                      for o in sorted(set(owner[first:first + len(mine)]))]
            stripped, positions, delta = place_rows(tokens, pieces, positions, start, [PAD])
            assert [p.shape[1] for p in stripped] == [5] * len(pieces)
        assert torch.equal(positions, expected), chunk
        assert delta == full_delta + 12


def test_consecutive_images_move_the_text_after_them_up():
    from par_vllm.positions import ReducedItem, reduced_prompt_positions

    tokens = [TEXT] * 2 + [PAD] * 3 + [TEXT] * 2
    positions, delta = reduced_prompt_positions(tokens, [ReducedItem(2, 3, [PAD] * 12, PAD, False)], grid_positions)
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert torch.equal(positions[0], positions[1]) and torch.equal(positions[0], positions[2])
    assert delta == 0


START, END = 7, 8


def frame_runs_positions(tokens, expansions):
    """A Qwen3-VL-style placement: each run of PAD between START and END is a frame of 2
    rows, placed as grid_positions places an image; the expansions must cover the runs."""
    runs, i = [], 0
    while i < len(tokens):
        if tokens[i] == PAD:
            j = i
            while j < len(tokens) and tokens[j] == PAD:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    assert all(any(o <= r < o + n for o, n in expansions) for r, _ in runs)
    return grid_positions(tokens, runs)


def test_a_video_written_one_run_per_frame_keeps_its_timestamps_and_places_all_k_in_the_first_run():
    """Qwen3-VL's video: per frame a timestamp, START, the frame's tokens, END. Reduced, all K
    tokens sit in the first frame's run (the processor's `reserve`); every other token of the
    video, and the text after it, keeps its unreduced position, and each kept row lands on
    its own frame's grid."""
    from par_vllm.models.base import reserve
    from par_vllm.positions import ReducedItem, place_rows, position_columns, reduced_prompt_positions
    from vllm.multimodal.processing import PromptUpdateDetails

    frame = [TEXT, START] + [PAD] * 6 + [END]
    full_video = frame * 3
    reserved = reserve(PromptUpdateDetails.select_token_id(full_video, PAD), 5)
    assert reserved.full == [TEXT, START] + [PAD] * 5 + [END] + [TEXT, START, END] * 2
    assert reserved.is_embed(reserved.full).sum() == 5
    whole = PromptUpdateDetails.select_token_id(full_video, PAD)
    assert reserve(whole, 18) is whole  # K = N: the family's own placeholders
    assert reserve([PAD] * 12, 4) == [PAD] * 4
    tokens = [TEXT] * 2 + reserved.full + [TEXT] * 3
    item = ReducedItem(2, len(reserved.full), full_video, PAD, True)
    up_front, delta = reduced_prompt_positions(tokens, [item], frame_runs_positions)
    expanded = [TEXT] * 2 + full_video + [TEXT] * 3
    full, full_delta = frame_runs_positions(expanded, [(2, len(full_video))])
    video_at = [2 + i for i, t in enumerate(full_video) if t == PAD]
    kept = torch.tensor([0, 5, 8, 13, 17])  # frames 0, 0, 1, 2, 2
    offsets = full[:, [video_at[k] for k in kept]].T - full[0, video_at[0]]
    rows = torch.cat([torch.randn(5, 4), position_columns(offsets, 5, torch.zeros(1))], dim=1)
    _, positions, delta = place_rows(tokens, [rows], up_front, 0, [PAD])
    pads = [i for i, t in enumerate(tokens) if t == PAD]
    assert positions[:, pads].T.tolist() == full[:, [video_at[k] for k in kept]].T.tolist()
    others = [i for i, t in enumerate(tokens) if t != PAD]
    assert positions[:, others].tolist() == full[:, [i for i, t in enumerate(expanded) if t != PAD]].tolist()
    assert delta == full_delta + 18 - 5


def test_position_columns_carry_large_offsets_exactly_in_bfloat16():
    from par_vllm.positions import place_rows, position_columns

    offsets = torch.tensor([[0, 300, 1000], [0, 65535, 2]])
    rows = torch.cat([torch.zeros(2, 4, dtype=torch.bfloat16),
                      position_columns(offsets, 2, torch.zeros(1, dtype=torch.bfloat16))], dim=1)
    _, positions, _ = place_rows([TEXT, PAD, PAD], [rows], torch.zeros(3, 3, dtype=torch.long), 0, [PAD])
    assert positions[:, 1:].T.tolist() == [[1, 301, 1001], [1, 65536, 3]]
