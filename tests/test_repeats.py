"""PAR for videos with their repeats merged first (par_merge_repeats, par_vllm/repeats.py),
against the reference it builds on."""

import pytest
import torch

from par_vllm.dispatch import reduce_per_image
from par_vllm.reduction import par_reduce
from par_vllm.repeats import reduce_video, roots
from par_vllm.settings import ParSettings

STEPS, PLACES, DIM = 4, 30, 16
SETTINGS = ParSettings(merge_repeats=True)
OFF = ParSettings(merge_repeats=False)


def clip(changes=(), seed=0):
    """A clip of STEPS frame pairs that repeat the first, but for the (step, place) tokens
    in `changes`, which get new features (from that step on at that place)."""
    g = torch.Generator().manual_seed(seed)
    pairs = [torch.randn(PLACES, DIM, generator=g)]
    for step in range(1, STEPS):
        pair = pairs[-1].clone()
        for changed_step, place in changes:
            if changed_step == step:
                pair[place] = torch.randn(DIM, generator=g)
        pairs.append(pair)
    query = torch.randn(1, 3, DIM, generator=g)
    return torch.cat(pairs)[None], query, torch.ones(1, 3, dtype=torch.bool)


def test_each_token_roots_at_the_start_of_its_run_at_its_place():
    similarity = torch.tensor([[0.95, 0.2], [0.99, 0.95], [0.1, 0.99]])  # 4 steps x 2 places
    assert roots(similarity, 0.9).view(4, 2).tolist() == [[0, 1], [0, 3], [0, 3], [6, 3]]


@pytest.mark.parametrize("num_kept", [1, 7, 29])
def test_a_still_clip_reduces_as_its_one_frame_pair_does(num_kept):
    visual, query, mask = clip()
    out = reduce_video(visual, query, mask, num_kept, SETTINGS, STEPS)
    alone = par_reduce(visual[:, :PLACES], query, mask, num_kept, SETTINGS)
    assert torch.equal(out.kept_indices, alone.kept_indices)
    # Every repeat goes where its first occurrence went, and merges in as a copy of it.
    assert torch.equal(out.assignment.view(STEPS, PLACES), alone.assignment.expand(STEPS, PLACES))
    torch.testing.assert_close(out.tokens, alone.tokens)


def test_changed_tokens_compete_and_their_repeats_follow_them():
    changes = [(1, 3), (2, 3), (2, 17), (3, 5)]
    visual, query, mask = clip(changes)
    out = reduce_video(visual, query, mask, 8, SETTINGS, STEPS)
    distinct = sorted([place for place in range(PLACES)] + [step * PLACES + place for step, place in changes])
    alone = par_reduce(visual[:, distinct], query, mask, 8, SETTINGS)
    assert out.kept_indices[0].tolist() == [distinct[i] for i in alone.kept_indices[0].tolist()]
    # (3, 17) repeats (2, 17), which is distinct: it goes wherever (2, 17) went.
    assert out.assignment[0, 3 * PLACES + 17] == out.assignment[0, 2 * PLACES + 17]
    assert out.assignment[0, 3 * PLACES + 17] == alone.assignment[0, distinct.index(2 * PLACES + 17)]


def test_with_k_or_fewer_distinct_every_one_is_kept_and_the_most_changed_repeats_too():
    visual, query, mask = clip([(2, 4)])
    # Two places change a little (still repeats) from steps 1 and 3 on: of the repeats, those
    # two changed most.
    for step, place, seed in [(1, 9, 1), (2, 9, 1), (3, 9, 1), (3, 20, 2)]:
        visual[0, step * PLACES + place] += 0.05 * torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    out = reduce_video(visual, query, mask, PLACES + 3, SETTINGS, STEPS)
    kept = out.kept_indices[0].tolist()
    assert kept == sorted(list(range(PLACES)) + [PLACES + 9, 2 * PLACES + 4, 3 * PLACES + 20])
    # Each token goes to the latest kept token at its place at or before its own step.
    for index in range(STEPS * PLACES):
        step, place = divmod(index, PLACES)
        target = max(k for k in kept if k % PLACES == place and k // PLACES <= step)
        assert kept[out.assignment[0, index]] == target
    assert torch.isfinite(out.tokens).all() and out.tokens.shape == (1, PLACES + 3, DIM)


def test_the_executor_reduces_only_videos_differently_and_only_when_asked():
    visual = clip([(1, 2), (3, 11)])[0]
    embed = torch.nn.Embedding(50, DIM)
    ids = torch.tensor([4, 9])
    features = [visual[0], visual[0]]
    plain = reduce_per_image(features, [ids, ids], [OFF, OFF], embed, with_kept=True, steps=[STEPS, STEPS])
    unsteady = reduce_per_image(features, [ids, ids], [OFF, OFF], embed, with_kept=True)
    merged = reduce_per_image(features, [ids, ids], [SETTINGS, OFF], embed, with_kept=True, steps=[STEPS, 1])
    for (a, ka), (b, kb) in zip(plain, unsteady):
        assert torch.equal(a, b) and torch.equal(ka, kb)  # merge_repeats off: steps change nothing
    # On, for the video only: the second item is an image and reduces as before.
    assert torch.equal(merged[1][0], plain[1][0])
    assert not torch.equal(merged[0][1], plain[0][1])
    assert len(merged[0][1]) == len(plain[0][1]) == SETTINGS.num_kept(STEPS * PLACES)
