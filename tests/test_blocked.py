"""The blocked path (par_vllm/blocked.py) gives the reference's answer: the same kept
tokens, retrieval and routing; merged tokens equal up to float rounding (a matrix library
may round a small block's products differently in the last bit)."""

import pytest
import torch
import torch.nn.functional as F

from par_vllm import blocked, reduction
from par_vllm.reduction import reduce_by_relevance, relevance
from par_vllm.settings import ParSettings


def clustered(num_visual: int, dim: int, seed: int) -> torch.Tensor:
    """Tokens around a few centres, some repeated exactly (ties in every distance and density)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=generator)
    owner = torch.randint(0, 12, (num_visual,), generator=generator)
    visual = centres[owner] + 0.3 * torch.randn(num_visual, dim, generator=generator)
    repeats = torch.randint(0, num_visual, (num_visual // 10,), generator=generator)
    visual[repeats[1::2]] = visual[repeats[::2]]
    return visual


@pytest.mark.parametrize("num_visual, num_kept", [(300, 33), (700, 78), (700, 5)])
@pytest.mark.parametrize("settings", [
    {}, {"similarity": "cosine"}, {"routing": "nearest"}, {"centres": "farthest_point"},
    {"centre_relevance": 0.0, "min_retrieved": 0}, {"knn_k": 1}, {"duplicate_threshold": 0.5},
], ids=str)
@pytest.mark.parametrize("with_query", [True, False])
def test_blocked_equals_the_reference(monkeypatch, num_visual, num_kept, settings, with_query):
    # Few listed neighbours and small blocks: many tokens need their whole row again.
    monkeypatch.setattr(blocked, "NEIGHBOURS", 4)
    settings = ParSettings(**settings)
    visual = torch.stack([clustered(num_visual, 64, seed) for seed in (0, 1)])
    query = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[True, True, False], [True, False, False]]) & with_query
    visual_n = F.normalize(visual, dim=-1)
    rel, aware = relevance(visual_n, F.normalize(query, dim=-1), mask, settings.relevance)
    reference = reduce_by_relevance(visual, visual_n, rel, aware, num_kept, settings)
    for block in (64, 256):
        out = blocked.reduce_blocked(visual, rel, aware, num_kept, settings, block)
        assert torch.equal(out.kept_indices, reference.kept_indices)
        assert torch.equal(out.retrieved, reference.retrieved)
        assert torch.equal(out.assignment, reference.assignment)
        assert torch.equal(out.tokens, reference.tokens)


def test_large_images_take_the_blocked_path(monkeypatch):
    calls = []
    monkeypatch.setattr(reduction, "FULL_MATRIX_MAX", 100)
    monkeypatch.setattr(blocked, "reduce_blocked", lambda *args: calls.append(1) or (_ for _ in ()).throw(RuntimeError))
    visual = clustered(101, 16, 0)[None]
    rel, aware = relevance(F.normalize(visual, dim=-1), torch.zeros(1, 0, 16), torch.zeros(1, 0, dtype=torch.bool), "max")
    with pytest.raises(RuntimeError):
        reduce_by_relevance(visual, None, rel, aware, 10, ParSettings())
    assert calls


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("with_query", [True, False])
def test_blocked_relevance_matches_the_reference(reduce, with_query):
    visual = torch.stack([clustered(700, 64, seed) for seed in (0, 1)])
    query = F.normalize(torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5)), dim=-1)
    mask = torch.tensor([[True, True, False], [True, False, False]]) & with_query
    reference, aware = relevance(F.normalize(visual, dim=-1), query, mask, reduce)
    rel, blocked_aware = blocked.relevance_blocked(visual, query, mask, reduce, block=64)
    assert torch.equal(aware, blocked_aware)
    torch.testing.assert_close(rel, reference, rtol=0, atol=1e-6)


def test_par_reduce_on_a_large_image_keeps_what_the_reference_keeps(monkeypatch):
    from par_vllm.reduction import par_reduce

    visual = torch.stack([clustered(700, 64, seed) for seed in (0, 1)])
    query = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[True, True, False], [False, False, False]])
    reference = par_reduce(visual, query, mask, 78, ParSettings())
    monkeypatch.setattr(reduction, "FULL_MATRIX_MAX", 100)
    large = par_reduce(visual, query, mask, 78, ParSettings())
    assert torch.equal(large.kept_indices, reference.kept_indices)
    assert torch.equal(large.assignment, reference.assignment)
    torch.testing.assert_close(large.tokens, reference.tokens)


@pytest.mark.parametrize("chosen", ["all", "three", "one", "none", "two copies"])
def test_blocked_density_peaks_equal_the_reference_for_any_candidates(monkeypatch, chosen):
    # Density peaks alone, over candidate sets down to none: the densest token (no denser
    # one anywhere) and the local maxima take the path that compares with every token.
    monkeypatch.setattr(blocked, "NEIGHBOURS", 4)
    visual = clustered(300, 64, 3)
    candidates = {
        "all": torch.ones(300, dtype=torch.bool),
        "three": torch.arange(300) % 100 == 7,
        "one": torch.arange(300) == 42,
        "none": torch.zeros(300, dtype=torch.bool),
        "two copies": torch.isin(torch.arange(300), torch.tensor([10, 250])),
    }[chosen]
    if chosen == "two copies":
        visual[250] = visual[10]
    units = F.normalize(visual, dim=-1)
    reference = reduction.density_peaks(reduction.similarities(units[None]), candidates[None], 5)[0]
    for block in (64, 256):
        space = blocked.Space(visual, None, block)
        mean_d2, near_d2, near_index = blocked.nearest_candidates(space, candidates, 5)
        density = torch.exp(-mean_d2)
        delta = blocked.nearest_denser(space, candidates, density, near_d2, near_index)
        assert torch.equal((density * delta).masked_fill(~candidates, 0.0), reference)


def test_identical_tokens_list_lower_indexed_copies_so_few_need_a_second_pass():
    # A flat region or a still part of a video: many exact copies of one token, equally
    # dense, where the lower index is denser. Each copy's list should hold earlier copies,
    # found first, or nearly every copy would be compared with every token again. Tiles
    # of 128 candidates leave a narrow last tile, whose merge is padded.
    generator = torch.Generator().manual_seed(4)
    visual = torch.randn(300, 64, generator=generator)
    copies = torch.randperm(300, generator=generator)[:200].sort().values
    visual[copies] = visual[copies[0]].clone()
    candidates = torch.ones(300, dtype=torch.bool)
    _, _, near_index = blocked.nearest_candidates(blocked.Space(visual, None, 64), candidates, 5)
    later = copies[blocked.NEIGHBOURS + 1:]
    assert bool((near_index[later] < later[:, None]).any(dim=-1).all())
