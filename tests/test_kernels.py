"""Every Triton kernel against the torch reference of the same PAR step.

Without a GPU they run under TRITON_INTERPRET=1 (set in conftest), so sizes stay small
here; the large shapes belong to benchmarks/kernels.py. Tie rule (kernels and reference
alike): on equal scores the lower index wins. Float32 accumulation orders differ, so
where two candidates' scores are within TIE of each other, either choice is accepted.
"""

import pytest
import torch
import torch.nn.functional as F

from par_vllm.settings import ParSettings
from par_vllm.kernels import relevance_topk, route_merge
from par_vllm.reduction import near_duplicates, par_reduce, relevance, retrieve, route
from par_vllm.reduction import merge as reference_merge

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TIE = 1e-5
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(batch, n, d, t, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(batch, n, d, generator=g).to(dtype).to(DEVICE)
    query = torch.randn(batch, t, d, generator=g).to(DEVICE)
    lengths = torch.randint(0, t + 1, (batch,), generator=g).to(DEVICE) if t else torch.zeros(batch, dtype=torch.long, device=DEVICE)
    if t:
        lengths[0] = t  # at least one full-length prompt
    mask = torch.arange(t, device=DEVICE)[None, :] < lengths[:, None]
    return visual, F.normalize(query, dim=-1), lengths, mask


# (B, N, D, T, K): N 1..2880, D 8..4096, T 0..512, B 1..64, K 1..N, odd sizes.
RELEVANCE_SHAPES = [
    (1, 1, 8, 1, 1), (3, 7, 24, 5, 3), (2, 33, 8, 0, 5), (64, 5, 8, 2, 5), (2, 577, 40, 9, 64),
    (1, 2880, 8, 3, 320), (1, 45, 4096, 3, 7), (1, 20, 24, 512, 19), (4, 100, 130, 17, 100),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RELEVANCE_SHAPES)
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_relevance_topk_matches_reference(shape, dtype, reduce):
    batch, n, d, t, k = shape
    visual, query_n, lengths, mask = inputs(batch, n, d, t, dtype)
    poisoned = torch.full((batch, n), float("nan"), device=DEVICE)
    rel = relevance_topk.relevance(visual, query_n, mask, reduce, out=poisoned)
    assert rel.data_ptr() == poisoned.data_ptr()
    ref, _ = relevance(F.normalize(visual.float(), dim=-1), query_n, mask, reduce)
    has_query = lengths > 0
    assert not torch.isnan(rel).any(), "every element written"
    torch.testing.assert_close(rel[has_query], ref[has_query], atol=1e-5, rtol=1e-5)

    _, top = relevance_topk.relevance_topk(visual, query_n, mask, reduce, k)
    assert top.shape == (batch, k)
    for b in torch.nonzero(has_query).flatten().tolist():
        ref_sorted = torch.sort(ref[b], descending=True, stable=True)
        expected = ref_sorted.indices[:k]
        assert len(set(top[b].tolist())) == k, "k distinct tokens"
        if not torch.equal(top[b], expected):  # only near-ties may reorder or swap
            kth = ref_sorted.values[k - 1]
            near_kth = set(torch.nonzero((ref[b] - kth).abs() <= TIE).flatten().tolist())
            # a token in one top-k but not the other is within TIE of the k-th relevance
            assert set(top[b].tolist()) ^ set(expected.tolist()) <= near_kth
            # and the kernel's order is descending in the reference's relevance, up to TIE
            assert (ref[b][top[b]].diff() <= TIE).all()


ROUTE_SHAPES = [
    (1, 1, 8, 1), (2, 9, 16, 3), (3, 70, 24, 9), (1, 577, 40, 64), (64, 12, 8, 5),
    (1, 2880, 8, 40), (1, 60, 4096, 6), (2, 130, 72, 130), (1, 300, 16, 1),
]


def reference_setup(visual, k, seed=0):
    """Kept tokens, retrieved and duplicate masks as the reference would produce them."""
    batch, n, _ = visual.shape
    visual_n = F.normalize(visual.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    rel = torch.rand(batch, n, generator=g).to(DEVICE)
    retrieved = retrieve(rel, k, 0.0, 0.5)
    sim = visual_n @ visual_n.transpose(1, 2)
    duplicates = near_duplicates(sim, retrieved, 0.05)  # low threshold: many duplicates
    order = torch.argsort(torch.rand(batch, n, generator=g).to(DEVICE) - 2 * retrieved.float(), dim=1)
    kept = order[:, :k].sort(dim=1).values
    return visual_n, sim, rel, kept, retrieved, duplicates


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROUTE_SHAPES)
@pytest.mark.parametrize("separate", [False, True])
def test_route_matches_reference(shape, dtype, separate):
    batch, n, d, k = shape
    visual, *_ = inputs(batch, n, d, 0, dtype)
    visual_n, sim, _, kept, retrieved, duplicates = reference_setup(visual, k)
    poisoned = torch.full((batch, n), -7, dtype=torch.long, device=DEVICE)
    got = route_merge.route(visual_n, kept, retrieved, duplicates, separate, out=poisoned)
    assert (poisoned >= 0).all() and (poisoned < k).all(), "every element written, in range"
    expected = route(sim, kept, retrieved, duplicates, separate)
    differ = got != expected
    if differ.any():  # only near-ties may differ
        to_kept = sim.gather(2, kept[:, None, :].expand(batch, n, k))
        chosen = to_kept.gather(2, got[..., None]).squeeze(-1)
        best = to_kept.gather(2, expected[..., None]).squeeze(-1)
        assert ((chosen - best).abs()[differ] <= TIE).all()
    # Near-duplicates of retrieved tokens that were not kept land on retrieved tokens only.
    kept_retrieved = retrieved.gather(1, kept)
    routed = duplicates.scatter(1, kept, False)
    assert kept_retrieved.gather(1, got)[routed].all()
    if separate:  # ... and, where the image has a centre, nothing else does.
        others = ~duplicates.scatter(1, kept, True) & ~kept_retrieved.all(dim=1, keepdim=True)
        assert not kept_retrieved.gather(1, got)[others].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROUTE_SHAPES)
def test_merge_matches_reference(shape, dtype):
    batch, n, d, k = shape
    visual, *_ = inputs(batch, n, d, 0, dtype, seed=1)
    visual_n, sim, rel, kept, retrieved, duplicates = reference_setup(visual, k, seed=1)
    assignment = route(sim, kept, retrieved, duplicates)
    weight = torch.exp(rel)
    poisoned = torch.full((batch, k, d), float("nan"), dtype=dtype, device=DEVICE)
    got = route_merge.merge(visual, weight, kept, assignment, out=poisoned)
    assert not torch.isnan(poisoned).any(), "every element written"
    expected = reference_merge(visual, weight, kept, assignment)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    alone = torch.zeros(batch, k, dtype=torch.long, device=DEVICE).scatter_add_(
        1, assignment, torch.ones_like(assignment)) == 1
    assert torch.equal(got[alone], visual.gather(1, kept[..., None].expand(batch, k, d))[alone])


def test_relevance_accepts_padding_anywhere():
    visual, query_n, _, _ = inputs(3, 50, 24, 6, torch.float32, seed=9)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]],
                        dtype=torch.bool, device=DEVICE)
    for reduce in ("max", "mean"):
        got = relevance_topk.relevance(visual, query_n, mask, reduce)
        ref, _ = relevance(F.normalize(visual, dim=-1), query_n, mask, reduce)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, similarity, routing", [
    ((2, 150, 32, 6, 16), "cosine", "nearest"), ((1, 576, 64, 5, 64), "cosine", "nearest"),
    ((3, 40, 8, 0, 4), "cosine", "nearest"), ((2, 150, 32, 6, 16), "centred", "separate"),
    ((1, 576, 64, 5, 64), "centred", "separate"), ((1, 144, 64, 3, 16), "centred", "nearest"),
    ((3, 40, 8, 0, 4), "cosine", "separate")])
def test_whole_reduction_with_kernels_matches_reference(shape, similarity, routing, dtype):
    batch, n, d, t, k = shape
    visual, query_n, _, mask = inputs(batch, n, d, t, dtype, seed=2)
    settings = {"similarity": similarity, "routing": routing}
    ref = par_reduce(visual, query_n, mask, k, ParSettings(backend="torch", **settings))
    got = par_reduce(visual, query_n, mask, k, ParSettings(backend="triton", **settings))
    assert torch.equal(got.kept_indices, ref.kept_indices)
    agree = (got.assignment == ref.assignment).float().mean()
    assert agree == 1.0
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.tokens.float(), ref.tokens.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend, on_cuda, installed, chosen", [
    ("auto", True, True, True), ("auto", True, False, False), ("auto", False, True, False),
    ("auto", False, False, False), ("torch", True, True, False), ("triton", False, True, True),
])
def test_the_dispatch_rule_picks_kernels_for_cuda_tensors_under_auto(backend, on_cuda, installed, chosen):
    from par_vllm.reduction import kernels_chosen

    assert kernels_chosen(backend, on_cuda, installed) is chosen


def test_the_dispatch_rule_is_what_use_kernels_applies_to_a_tensor():
    from par_vllm.reduction import use_kernels

    assert not use_kernels(torch.zeros(1), "auto")  # a CPU tensor
    assert use_kernels(torch.zeros(1), "triton") and not use_kernels(torch.zeros(1), "torch")
