"""The torch reference of PAR, on its own (no vLLM)."""

import pytest
import torch
import torch.nn.functional as F

from par_vllm.settings import ParSettings
from par_vllm.dispatch import reduce_per_image, reduce_tokens
from par_vllm.reduction import merge, near_duplicates, par_reduce, retrieve, similarities, token_space


def make_inputs(batch, n, d, t, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(batch, n, d, generator=g).to(dtype)
    query = torch.randn(batch, t, d, generator=g).to(dtype)
    lengths = torch.randint(0, t + 1, (batch,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return visual, query, mask


@pytest.mark.parametrize(
    "batch, n, d, t, k",
    [(1, 1, 8, 3, 1), (1, 2, 8, 1, 1), (2, 7, 16, 4, 3), (3, 50, 32, 5, 1), (2, 64, 16, 0, 10),
     (4, 100, 24, 9, 99), (2, 576, 64, 12, 64), (1, 576, 64, 6, 7), (5, 33, 8, 2, 32)],
)
@pytest.mark.parametrize("centres", ["density_peaks", "farthest_point"])
def test_exactly_k_tokens_out_with_sorted_unique_representatives(batch, n, d, t, k, centres):
    visual, query, mask = make_inputs(batch, n, d, t)
    out = par_reduce(visual, query, mask, k, ParSettings(centres=centres))
    assert out.tokens.shape == (batch, k, d)
    assert out.kept_indices.shape == (batch, k)
    for row in out.kept_indices:
        assert torch.equal(row, row.unique(sorted=True)), "kept indices sorted and unique"
        assert 0 <= row.min() and row.max() < n
    # Every token is routed to an output token; each kept token to its own.
    assert out.assignment.shape == (batch, n)
    assert 0 <= out.assignment.min() and out.assignment.max() < k
    own = out.assignment.gather(1, out.kept_indices)
    assert torch.equal(own, torch.arange(k).expand(batch, k))
    assert torch.isfinite(out.tokens).all()


def test_k_equal_n_returns_the_input_unchanged():
    visual, query, mask = make_inputs(2, 40, 16, 4)
    out = par_reduce(visual, query, mask, 40, ParSettings())
    assert torch.equal(out.tokens, visual)
    assert torch.equal(out.kept_indices, torch.arange(40).expand(2, 40))


def test_merged_tokens_are_convex_combinations_of_their_members():
    visual, query, mask = make_inputs(3, 200, 16, 5, seed=3)
    out = par_reduce(visual, query, mask, 20, ParSettings())
    for b in range(3):
        for k in range(20):
            members = visual[b, out.assignment[b] == k]
            assert out.kept_indices[b, k] in (out.assignment[b] == k).nonzero()
            lo, hi = members.min(0).values, members.max(0).values
            assert (out.tokens[b, k] >= lo - 1e-5).all() and (out.tokens[b, k] <= hi + 1e-5).all()
            # A convex combination with weights that sum to one: solve for them and check.
            weights = torch.linalg.lstsq(
                torch.cat([members.T, torch.ones(1, len(members))]),
                torch.cat([out.tokens[b, k], torch.ones(1)])[:, None],
            ).solution.squeeze(1)
            if len(members) <= 16:  # identifiable: at most D unknowns
                assert (weights > -1e-4).all() and abs(weights.sum() - 1) < 1e-4


def test_merge_is_the_weighted_mean():
    visual = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])
    weight = torch.tensor([[1.0, 3.0, 1.0, 5.0]])
    kept = torch.tensor([[0, 3]])
    assignment = torch.tensor([[0, 0, 0, 1]])
    merged = merge(visual, weight, kept, assignment)
    assert torch.allclose(merged[0, 0], torch.tensor([6.0 / 5, 4.0 / 5]))
    assert torch.equal(merged[0, 1], visual[0, 3])


def test_deterministic():
    visual, query, mask = make_inputs(4, 300, 32, 6, seed=5)
    a = par_reduce(visual, query, mask, 30, ParSettings())
    b = par_reduce(visual.clone(), query.clone(), mask.clone(), 30, ParSettings())
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.kept_indices, b.kept_indices)


def test_tokens_matching_the_prompt_are_retrieved_and_kept():
    torch.manual_seed(0)
    n, d = 576, 64
    visual = torch.randn(1, n, d)
    query = torch.randn(1, 2, d)
    relevant = [17, 300, 555]
    for i, token in enumerate(relevant):
        visual[0, token] = query[0, i % 2] + 0.05 * torch.randn(d)
    out = par_reduce(visual, query, torch.ones(1, 2, dtype=torch.bool), 64, ParSettings())
    assert out.prompt_aware.all()
    assert set(relevant) <= set(out.retrieved[0].nonzero().flatten().tolist())
    assert set(relevant) <= set(out.kept_indices[0].tolist())
    assert out.retrieved.sum() <= 32  # retrieval_share 0.5 of K


@pytest.mark.parametrize("n, panel", [(300, 64), (700, 256), (2304, 256), (100, 256)])
def test_similarities_by_panels_are_the_whole_product(n, panel):
    units = F.normalize(torch.randn(2, n, 48, generator=torch.Generator().manual_seed(n)), dim=-1)
    units[:, n // 2] = units[:, 1]  # a repeated token: ties among its similarities
    sim = similarities(units, panel)
    assert torch.equal(sim, sim.transpose(1, 2))
    torch.testing.assert_close(sim, units @ units.transpose(1, 2), rtol=0, atol=1e-6)


def test_near_duplicates_of_a_retrieved_token_merge_into_it():
    torch.manual_seed(1)
    d = 32
    visual = torch.randn(1, 100, d)
    query = torch.randn(1, 1, d)
    visual[0, 10] = query[0, 0]
    for copy in (11, 12, 13):
        visual[0, copy] = query[0, 0] * 0.97 + 0.01 * torch.randn(d)
    out = par_reduce(visual, query, torch.ones(1, 1, dtype=torch.bool), 20,
                     ParSettings(retrieval_share=0.05))  # room for a single retrieved token
    assert out.retrieved[0].nonzero().flatten().tolist() == [10]
    slot = out.kept_indices[0].tolist().index(10)
    assert all(out.assignment[0, c] == slot for c in (11, 12, 13))


def test_centred_similarity_ignores_a_direction_every_token_shares():
    # Tokens that share one large direction all look alike by cosine, so a 0.9 threshold
    # calls every token a near-duplicate of the retrieved one; centred on the image's mean
    # they are told apart, and only the real copies merge into it.
    from par_vllm.reduction import near_duplicates, token_space

    torch.manual_seed(5)
    d = 32
    shared = F.normalize(torch.randn(d), dim=0) * 40
    visual = torch.randn(1, 60, d)
    visual[0, 1:4] = visual[0, 0] + 0.05 * torch.randn(3, d)
    visual = visual + shared
    retrieved = torch.zeros(1, 60, dtype=torch.bool)
    retrieved[0, 0] = True
    visual_n = F.normalize(visual, dim=-1)
    for similarity, expected in (("cosine", list(range(1, 60))), ("centred", [1, 2, 3])):
        space = token_space(visual, visual_n, similarity)
        duplicates = near_duplicates(space @ space.transpose(1, 2), retrieved, 0.9)
        assert duplicates[0].nonzero().flatten().tolist() == expected, similarity


def test_centred_reduction_does_not_change_when_every_token_moves_together():
    from par_vllm.reduction import reduce_by_relevance

    visual, _, _ = make_inputs(2, 80, 16, 1, seed=6)
    rel = torch.randn(2, 80, generator=torch.Generator().manual_seed(7))
    aware = torch.ones(2, dtype=torch.bool)
    settings = ParSettings(similarity="centred")
    outs = [reduce_by_relevance(v, F.normalize(v, dim=-1), rel, aware, 9, settings)
            for v in (visual, visual + 5 * torch.randn(16))]
    assert torch.equal(outs[0].kept_indices, outs[1].kept_indices)
    assert torch.equal(outs[0].assignment, outs[1].assignment)


def test_separate_routing_gives_retrieved_tokens_only_their_near_duplicates():
    from par_vllm.reduction import route

    # Kept: token 0 (retrieved) and token 1 (a centre). Token 2 is a near-duplicate of 0;
    # token 3 is closer to 0 than to 1 but not a near-duplicate.
    sim = torch.tensor([[[1.0, 0.1, 0.95, 0.6],
                         [0.1, 1.0, 0.1, 0.3],
                         [0.95, 0.1, 1.0, 0.5],
                         [0.6, 0.3, 0.5, 1.0]]])
    kept = torch.tensor([[0, 1]])
    retrieved = torch.tensor([[True, False, False, False]])
    duplicates = torch.tensor([[False, False, True, False]])
    assert route(sim, kept, retrieved, duplicates).tolist() == [[0, 1, 0, 0]]
    assert route(sim, kept, retrieved, duplicates, separate=True).tolist() == [[0, 1, 0, 1]]
    # With no centre kept, a token has nowhere else to go than a retrieved token.
    everything_retrieved = torch.tensor([[True, True, False, False]])
    assert route(sim, kept, everything_retrieved, duplicates, separate=True).tolist() == [[0, 1, 0, 0]]


def test_farthest_point_centres_cover_every_distinct_group():
    # 6 tight groups of tokens, one 10x larger than the rest: density peaks spend the
    # centres on the big group; farthest-point sampling puts one in every group.
    torch.manual_seed(4)
    d = 32
    anchors = F.normalize(torch.randn(6, d), dim=-1) * 4
    sizes = [100, 10, 10, 10, 10, 10]
    group = torch.cat([torch.full((s,), g) for g, s in enumerate(sizes)])
    visual = (anchors[group] + 0.3 * torch.randn(len(group), d))[None]
    query = torch.randn(1, 0, d)
    out = par_reduce(visual, query, torch.zeros(1, 0, dtype=torch.bool), 6,
                     ParSettings(centres="farthest_point", retrieval_share=0.0, similarity="cosine"))
    assert sorted(group[out.kept_indices[0]].tolist()) == [0, 1, 2, 3, 4, 5]
    # Centred on this image's mean (which the big group dominates), the big group's tokens
    # are short vectors whose directions are largely noise, so two centres land in it.


def test_centre_relevance_steers_density_peaks_towards_the_prompt():
    # A big dense group the prompt is not about and a small one it is about; nothing is
    # retrieved, so one centre decides. Prompt-agnostic density peaks take the big group;
    # weighted by relevance, the centre moves to the group the prompt names.
    torch.manual_seed(5)
    d = 32
    anchors = F.normalize(torch.randn(3, d), dim=-1) * 4
    sizes = [60, 20, 8]
    group = torch.cat([torch.full((s,), g) for g, s in enumerate(sizes)])
    visual = (anchors[group] + 0.3 * torch.randn(len(group), d))[None]
    query = anchors[2][None, None]
    mask = torch.ones(1, 1, dtype=torch.bool)
    base = dict(retrieval_share=0.0, similarity="cosine")
    agnostic = par_reduce(visual, query, mask, 2, ParSettings(**base))
    steered = par_reduce(visual, query, mask, 2, ParSettings(**base, centre_relevance=2.0))
    assert 2 not in group[agnostic.kept_indices[0]].tolist()
    assert 2 in group[steered.kept_indices[0]].tolist()
    # The steered centre still takes in its group by routing.
    kept_group = group[steered.kept_indices[0]]
    assert (kept_group[steered.assignment[0][group == 2]] == 2).all()


def test_prompt_weight_is_relevance_rescaled_per_image():
    from par_vllm.reduction import prompt_weight

    rel = torch.tensor([[0.1, 0.2, 0.3], [5.0, 5.0, 5.0], [0.1, 0.2, 0.3]])
    aware = torch.tensor([True, True, False])
    assert torch.equal(prompt_weight(rel, 0.0, aware), torch.ones_like(rel))
    assert torch.allclose(prompt_weight(rel, 1.0, aware)[0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(prompt_weight(rel, 2.0, aware)[0], torch.tensor([0.0, 0.25, 1.0]))
    # Flat relevance, or saliency standing in for a missing prompt: centres unweighted.
    assert torch.equal(prompt_weight(rel, 2.0, aware)[1:], torch.ones(2, 3))


def test_farthest_point_centres_start_from_retrieved_tokens():
    # With tokens already retrieved, the first centre is the token farthest from them,
    # not a second copy of what retrieval kept.
    from par_vllm.reduction import farthest_points

    sim = torch.tensor([[[1.0, 0.9, 0.1, 0.5],
                         [0.9, 1.0, 0.2, 0.4],
                         [0.1, 0.2, 1.0, 0.3],
                         [0.5, 0.4, 0.3, 1.0]]])
    retrieved = torch.tensor([[True, False, False, False]])
    rel = torch.tensor([[0.9, 0.8, 0.0, 0.1]])
    score = farthest_points(sim, ~retrieved, retrieved, rel, steps=3)
    assert score.tolist() == [[0.0, 1.0, 3.0, 2.0]]
    # Nothing retrieved: the most relevant token seeds the sampling.
    none = torch.zeros_like(retrieved)
    assert farthest_points(sim, ~none, none, rel, steps=1).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    # A weight scales the distances: token 3 (distance 0.5) beats token 2 (0.9) at 0.2 weight.
    weight = torch.tensor([[1.0, 1.0, 0.2, 1.0]])
    assert farthest_points(sim, ~retrieved, retrieved, rel, steps=1, weight=weight).tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_each_prompt_retrieves_the_tokens_that_match_it_and_not_the_others():
    torch.manual_seed(7)
    n, d = 576, 64
    visual, words = torch.randn(1, n, d), torch.randn(1, 2, d)
    planted = {0: [40, 200, 390], 1: [90, 310, 500]}  # tokens matching word 0, word 1
    for word, tokens in planted.items():
        for token in tokens:
            visual[0, token] = words[0, word] + 0.05 * torch.randn(d)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for word, tokens in planted.items():
        out = par_reduce(visual, words[:, word:word + 1], mask, 64, ParSettings())
        retrieved = set(out.retrieved[0].nonzero().flatten().tolist())
        assert set(tokens) <= retrieved and not set(planted[1 - word]) & retrieved


def test_image_only_falls_back_to_a_prompt_agnostic_score():
    visual, query, _ = make_inputs(2, 120, 16, 3, seed=2)
    empty = par_reduce(visual, query[:, :0], torch.zeros(2, 0, dtype=torch.bool), 12, ParSettings())
    masked = par_reduce(visual, query, torch.zeros(2, 3, dtype=torch.bool), 12, ParSettings())
    assert not empty.prompt_aware.any()
    assert torch.equal(empty.kept_indices, masked.kept_indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    visual, query, mask = make_inputs(2, 96, 32, 4, dtype=dtype)
    out = par_reduce(visual, query, mask, 16, ParSettings())
    assert out.tokens.dtype == dtype and torch.isfinite(out.tokens.float()).all()
    ref = par_reduce(visual.float(), query.float(), mask, 16, ParSettings())
    assert F.cosine_similarity(out.tokens.float(), ref.tokens, dim=-1).min() > 0.95


def test_reduce_per_image_mixes_sizes_settings_and_prompts():
    table = torch.nn.Embedding(50, 16)
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(n, 16, generator=g) for n in (40, 40, 25, 40)]
    queries = [torch.tensor([3, 4]), torch.tensor([], dtype=torch.long), torch.tensor([7]),
               torch.tensor([3, 4])]
    settings = [ParSettings(num_tokens=5), ParSettings(num_tokens=5),
                ParSettings(keep_ratio=0.5), ParSettings(enabled=False)]
    with torch.no_grad():
        out = reduce_per_image(features, queries, settings, embed_tokens=table)
        assert [o.shape[0] for o in out] == [5, 5, 13, 40]
        assert torch.equal(out[3], features[3])
        # Batched with others or alone, an image reduces the same way.
        alone = par_reduce(features[0][None], table(queries[0])[None],
                           torch.ones(1, 2, dtype=torch.bool), 5, settings[0])
        assert torch.allclose(out[0], alone.tokens[0])


@pytest.mark.parametrize("method", ["pool", "random", "topk", "diverse"])
@pytest.mark.parametrize("n, k", [(576, 64), (576, 29), (100, 7), (50, 1)])
def test_baselines_give_exactly_k(method, n, k):
    visual, query, mask = make_inputs(2, n, 16, 4, seed=4)
    out = reduce_tokens(visual, query, mask, k, ParSettings(method=method))
    assert out.tokens.shape == (2, k, 16) and out.kept_indices.shape == (2, k)
    assert out.assignment.min() >= -1 and out.assignment.max() < k
    a = reduce_tokens(visual, query, mask, k, ParSettings(method=method))
    assert torch.equal(out.tokens, a.tokens), "deterministic"
    if method != "pool":
        for row in out.kept_indices:
            assert torch.equal(row, row.unique(sorted=True))
        # Pruning: kept tokens are the inputs themselves, dropped ones map to -1.
        assert torch.equal(out.tokens, visual.gather(1, out.kept_indices[..., None].expand(-1, -1, 16)))
        assert (out.assignment == -1).sum() == 2 * (n - k)


def test_uniform_pool_is_2d_average_pooling():
    visual = torch.randn(1, 576, 8)
    out = reduce_tokens(visual, visual[:, :0], torch.zeros(1, 0, dtype=torch.bool), 64,
                        ParSettings(method="pool"))
    grid = visual.reshape(1, 24, 24, 8)
    assert torch.allclose(out.tokens[0, 0], grid[0, :3, :3].reshape(9, 8).mean(0), atol=1e-6)
    assert torch.allclose(out.tokens[0, 63], grid[0, 21:, 21:].reshape(9, 8).mean(0), atol=1e-6)


def test_uniform_pool_follows_a_non_square_grid():
    # A Qwen-VL landscape image: 12 rows x 24 columns of merged tokens, K = 32 pools 4 x 8
    # cells of 3 x 3 tokens, the same way reduce_per_image pools it when told the grid.
    visual = torch.randn(1, 288, 8)
    empty = (visual[:, :0], torch.zeros(1, 0, dtype=torch.bool))
    out = reduce_tokens(visual, *empty, 32, ParSettings(method="pool"), grid=(12, 24))
    grid = visual.reshape(1, 12, 24, 8)
    assert torch.allclose(out.tokens[0, 0], grid[0, :3, :3].reshape(9, 8).mean(0), atol=1e-6)
    assert torch.allclose(out.tokens[0, 9], grid[0, 3:6, 3:6].reshape(9, 8).mean(0), atol=1e-6)
    assert out.assignment[0, 24 * 3 + 3] == 9 and out.kept_indices[0, 9] == 24 * 4 + 4
    settings = ParSettings(method="pool", num_tokens=32)
    rows = reduce_per_image([visual[0]], [torch.tensor([], dtype=torch.long)], [settings],
                            embed_tokens=lambda ids: torch.zeros(len(ids), 8), grids=[(12, 24)])
    assert torch.allclose(rows[0], out.tokens[0])
    # PAR reads no grid: a landscape and a portrait image of one N reduce as one batch.
    batches = []
    reduce_per_image([visual[0], visual[0]], [torch.tensor([], dtype=torch.long)] * 2,
                     [ParSettings(num_tokens=32)] * 2, embed_tokens=lambda ids: torch.zeros(len(ids), 8),
                     on_batch=lambda images, implementation: batches.append(images), grids=[(12, 24), (24, 12)])
    assert batches == [2]
    with pytest.raises(ValueError, match="12 x 20 grid"):
        reduce_tokens(visual, *empty, 32, ParSettings(method="pool"), grid=(12, 20))


@pytest.mark.parametrize("k, rows, cols, shape", [(32, 12, 24, (4, 8)), (32, 24, 12, (8, 4)), (64, 24, 24, (8, 8)),
                                                   (29, 24, 24, (1, 29)), (12, 2, 30, (1, 12)), (6, 1, 10, (1, 6))])
def test_pooled_shape_follows_the_grid_aspect(k, rows, cols, shape):
    from par_vllm.baselines import pooled_shape

    assert pooled_shape(k, rows, cols) == shape


@pytest.mark.parametrize(("frames", "per_frame", "k", "kept_frames"), [
    (8, 16, 32, [2, 6]),  # two whole frames, each the middle of its half of the clip
    (8, 16, 16, [4]),
    (9, 16, 48, [1, 4, 7]),
    (8, 16, 20, [2, 6]),  # two frames, thinned evenly to 20 tokens
    (8, 16, 5, [4]),
    (3, 16, 48, [0, 1, 2]),
    (3, 16, 40, [0, 1, 2]),
])
def test_uniform_frames_keeps_evenly_spaced_frames_whole_then_thins_them(frames, per_frame, k, kept_frames):
    from par_vllm.baselines import uniform_frames

    kept = uniform_frames(frames, per_frame, k)
    assert len(kept) == k and bool((kept[1:] > kept[:-1]).all())
    assert sorted(set((kept // per_frame).tolist())) == kept_frames
    if k == len(kept_frames) * per_frame:
        assert kept.tolist() == [f * per_frame + i for f in kept_frames for i in range(per_frame)]
    else:  # thinned: no frame keeps more than its share plus one
        counts = torch.bincount(kept // per_frame, minlength=frames)[kept_frames]
        assert int(counts.max() - counts.min()) <= 1


def test_topk_keeps_the_most_relevant_and_diverse_ignores_the_prompt():
    torch.manual_seed(0)
    visual = torch.randn(1, 200, 32)
    query = torch.randn(1, 1, 32)
    visual[0, 42] = query[0, 0]
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert 42 in reduce_tokens(visual, query, mask, 5, ParSettings(method="topk")).kept_indices[0]
    other = torch.randn(1, 1, 32)
    a = reduce_tokens(visual, query, mask, 20, ParSettings(method="diverse"))
    b = reduce_tokens(visual, other, mask, 20, ParSettings(method="diverse"))
    assert torch.equal(a.kept_indices, b.kept_indices)


def test_separate_routing_always_leaves_a_centre_for_the_rest_of_the_image():
    # Retrieval allowed all of K, and far more outliers than K: under separate routing one
    # kept token is still a centre, and no token that is not a near-duplicate of a retrieved
    # token merges into one. Nearest routing may retrieve all of K.
    torch.manual_seed(6)
    visual = torch.randn(2, 64, 32)
    query = visual[:, :1] * 3
    mask = torch.ones(2, 1, dtype=torch.bool)
    loose = dict(retrieval_share=1.0, outlier_factor=0.0)
    for k in (1, 2, 5):
        out = par_reduce(visual, query, mask, k, ParSettings(**loose))
        kept_retrieved = out.retrieved.gather(1, out.kept_indices)
        assert (kept_retrieved.sum(dim=1) <= k - 1).all()
        space = token_space(visual, F.normalize(visual, dim=-1), "centred")
        duplicates = near_duplicates(space @ space.transpose(1, 2), out.retrieved, 0.9)
        into_retrieved = kept_retrieved.gather(1, out.assignment)
        assert not (into_retrieved & ~out.retrieved & ~duplicates).any()
    nearest = par_reduce(visual, query, mask, 5, ParSettings(**loose, routing="nearest"))
    assert nearest.retrieved.gather(1, nearest.kept_indices).all()


def test_min_retrieved_takes_the_most_relevant_tokens_when_none_is_an_outlier():
    # Relevance spread evenly: no token exceeds Q3 + 1.5 IQR, so outlier retrieval is empty
    # and every kept token would be a prompt-agnostic centre.
    rel = torch.linspace(0.0, 1.0, 40)[torch.randperm(40, generator=torch.Generator().manual_seed(0))][None]
    most_relevant = torch.argsort(rel[0], descending=True)
    assert not retrieve(rel, 10, 1.5, 0.5).any()
    for minimum in (1, 3):
        got = retrieve(rel, 10, 1.5, 0.5, min_retrieved=minimum)[0].nonzero().flatten()
        assert set(got.tolist()) == set(most_relevant[:minimum].tolist())
    # The cap still holds: floor(0.5 x 10) = 5, and under separate routing one less than K.
    assert retrieve(rel, 10, 1.5, 0.5, min_retrieved=8).sum() == 5
    assert retrieve(rel, 2, 1.5, 1.0, leave=1, min_retrieved=8).sum() == 1
    # Outliers beyond the minimum are still retrieved.
    spiked = rel.clone()
    spiked[0, most_relevant[:4]] += 5.0
    assert retrieve(spiked, 10, 1.5, 0.5, min_retrieved=1).sum() == 4


def test_min_retrieved_keeps_the_best_match_through_par_reduce():
    torch.manual_seed(7)
    visual = torch.randn(1, 64, 16)
    query = torch.randn(1, 1, 16)
    mask = torch.ones(1, 1, dtype=torch.bool)
    ranked = (F.normalize(visual, dim=-1)[0] @ F.normalize(query, dim=-1)[0, 0]).argsort(descending=True).tolist()
    paper = par_reduce(visual, query, mask, 4, ParSettings(min_retrieved=0))
    assert not paper.retrieved.any(), "random tokens: no outlier, so the minimum is what retrieves"
    out = par_reduce(visual, query, mask, 4, ParSettings(min_retrieved=1))
    assert out.retrieved[0].nonzero().flatten().tolist() == [ranked[0]]
    assert ranked[0] in out.kept_indices[0].tolist()
    default = par_reduce(visual, query, mask, 4, ParSettings())  # min_retrieved=2
    assert set(default.retrieved[0].nonzero().flatten().tolist()) == set(ranked[:2])


def test_a_backend_the_device_cannot_run_is_refused_by_name(monkeypatch):
    from par_vllm.settings import ParSettingError
    from par_vllm.reduction import check_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for backend in ("auto", "torch"):
        check_backend(backend, "cpu")
    check_backend("triton", "cuda")
    with pytest.raises(ParSettingError, match="par_backend: 'triton' needs a CUDA device") as info:
        check_backend("triton", "cpu")
    assert info.value.setting == "par_backend"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's interpreter runs the kernels on a CPU
    check_backend("triton", "cpu")


def test_failing_kernels_fall_back_to_the_reference_for_that_batch(monkeypatch):
    from par_vllm.kernels import relevance_topk

    def broken(*args, **kwargs):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setattr(relevance_topk, "relevance", broken)
    table = torch.nn.Embedding(50, 16)
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(40, 16, generator=g) for _ in range(3)]
    queries = [torch.tensor([3, 4]), torch.tensor([5]), torch.tensor([3])]
    forced = [ParSettings(num_tokens=6, backend="triton")] * 2 + [ParSettings(num_tokens=6, backend="torch")]
    failures, batches = [], []
    with torch.no_grad():
        out = reduce_per_image(features, queries, forced, embed_tokens=table,
                               on_batch=lambda n, impl: batches.append((n, impl)),
                               on_kernel_failure=failures.append)
        # the same batches, by the reference
        reference = (reduce_per_image(features[:2], queries[:2], [ParSettings(num_tokens=6)] * 2, embed_tokens=table)
                     + reduce_per_image(features[2:], queries[2:], forced[2:], embed_tokens=table))
    assert len(failures) == 1 and "active drivers" in str(failures[0])
    assert sorted(batches) == [(1, "torch"), (2, "torch")]
    for got, want in zip(out, reference):
        assert torch.equal(got, want)


def test_a_failure_outside_the_kernels_is_not_hidden(monkeypatch):
    import par_vllm.reduction as reduction

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the reference")

    monkeypatch.setattr(reduction, "reduce_by_relevance", broken)
    with pytest.raises(RuntimeError, match="a bug in the reference"):
        reduce_per_image([torch.randn(40, 16)], [torch.tensor([1])], [ParSettings(num_tokens=4, backend="torch")],
                         embed_tokens=torch.nn.Embedding(8, 16))


@pytest.mark.parametrize("method", ["par", "pool", "random", "topk", "diverse"])
def test_columns_not_scored_follow_the_scored_ones(method):
    """Qwen3-VL's deepstack columns: scored on the first columns only, the others keep the
    same rows and merge with the same weights. With the extra columns a copy of the scored
    ones, they come out equal to them; and they do not change what is kept."""
    torch.manual_seed(0)
    main = torch.randn(144, 16)
    table = torch.randn(50, 16)
    settings = [ParSettings(num_tokens=12, method=method, backend="torch")]
    query = [torch.tensor([3, 7])]
    (rows, kept), = reduce_per_image([torch.cat([main, main, 2 * main], dim=1)], query, settings,
                                     embed_tokens=table.__getitem__, score_dims=16, with_kept=True)
    (alone, alone_kept), = reduce_per_image([main], query, settings, embed_tokens=table.__getitem__, with_kept=True)
    assert torch.equal(kept, alone_kept) and torch.equal(rows[:, :16], alone)
    torch.testing.assert_close(rows[:, 16:32], alone)
    torch.testing.assert_close(rows[:, 32:], 2 * alone)
