"""PAR's visual token reduction: the readable torch reference.

Batched over images: B x N x D visual tokens (after the projector, in the LLM's
embedding space) and B x T x D prompt-token embeddings in; B x K x D out. Each step
of PAR (see PAR_SPEC.md) is its own function, so kernels can replace one step at a
time and be tested against it.

Selection is fully deterministic. Wherever scores tie, the lower token index wins
(stable sorts, first-index argmax); kernels follow the same rule.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .settings import ParSettingError, ParSettings

# Images of more visual tokens take par_vllm/blocked.py's path, which holds no N x N matrix
# but computes similarities again for each pairwise step. Up to here the full matrices are
# the faster path and their memory, which grows as N x N, is still of the order the
# blocked path takes for the largest images (benchmarks/par_cost.py measures both sides).
FULL_MATRIX_MAX = 3072


@dataclass
class Reduction:
    tokens: torch.Tensor        # B x K x D, in the raster order of kept_indices
    kept_indices: torch.Tensor  # B x K, ascending: each output token's representative
    assignment: torch.Tensor    # B x N, which output token (0..K-1) each input merged into;
                                # -1 where a pruning baseline dropped the token
    retrieved: torch.Tensor     # B x N bool, kept by semantic retrieval (prompt outliers)
    prompt_aware: torch.Tensor  # B bool, False where the image had no prompt to score against
    weight: torch.Tensor | None = None  # B x N, each token's weight in its merge (None: uniform)


def kernels_chosen(backend: str, on_cuda: bool, triton_installed: bool) -> bool:
    """The one rule that chooses the implementation: the Triton kernels when forced, or
    under "auto" for CUDA tensors where Triton is installed; this torch reference otherwise."""
    if backend in ("torch", "triton"):
        return backend == "triton"
    return on_cuda and triton_installed


def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(visual: torch.Tensor, backend: str) -> bool:
    return kernels_chosen(backend, visual.is_cuda, visual.is_cuda and triton_installed())


def check_backend(backend: str, device_type: str) -> None:
    """Refuse, naming the setting, a backend this server's device cannot run: forced
    Triton kernels need a CUDA device (or Triton's interpreter, TRITON_INTERPRET=1)."""
    if backend != "triton":
        return
    if not triton_installed():
        raise ParSettingError("par_backend: 'triton' needs the triton package, which this server "
                              "lacks; use 'auto' or 'torch'", setting="par_backend")
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ParSettingError(f"par_backend: 'triton' needs a CUDA device and this server runs on "
                              f"{device_type!r}; use 'auto' (kernels on GPU, torch elsewhere) or "
                              "'torch'", setting="par_backend")


def _stable_desc_order(score: torch.Tensor) -> torch.Tensor:
    return torch.argsort(score, dim=-1, descending=True, stable=True)


def saliency(visual_n: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt-agnostic score for image-only requests: how far a token is from the image's
    mean token (B x 1 x D, unit; computed from `visual_n` unless given). Distinctive tokens
    become retrieval outliers; density peaks cover the rest."""
    if mean is None:
        mean = F.normalize(visual_n.mean(dim=1, keepdim=True), dim=-1)
    return 1.0 - (visual_n @ mean.transpose(1, 2)).squeeze(-1)


def relevance(
    visual_n: torch.Tensor, query_n: torch.Tensor, query_mask: torch.Tensor, reduce: str,
    mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_i = max (or mean) over prompt tokens j of cos(v_i, q_j); saliency (against `mean`,
    see saliency) where T = 0.

    Returns (relevance B x N, prompt_aware B)."""
    has_query = query_mask.any(dim=-1)
    fallback = saliency(visual_n, mean)
    if query_n.shape[1] == 0:
        return fallback, has_query
    sim = visual_n @ query_n.transpose(1, 2)  # B x N x T
    mask = query_mask[:, None, :]
    if reduce == "max":
        rel = sim.masked_fill(~mask, -math.inf).amax(dim=-1)
    elif reduce == "mean":
        rel = (sim * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    else:
        raise ValueError(f"relevance reduce must be 'max' or 'mean', got {reduce!r}")
    return torch.where(has_query[:, None], rel, fallback), has_query


def retrieve(
    rel: torch.Tensor, num_kept: int, outlier_factor: float, retrieval_share: float, leave: int = 0,
    min_retrieved: int = 0,
) -> torch.Tensor:
    """Semantic retrieval: tokens whose relevance is an outlier (> Q3 + alpha * IQR) or
    among the `min_retrieved` most relevant, the most relevant first, at most
    floor(retrieval_share * K) of them and never more than K - leave. B x N bool."""
    quartiles = torch.quantile(rel, torch.tensor([0.25, 0.75], dtype=rel.dtype, device=rel.device), dim=1)
    q1, q3 = quartiles[0], quartiles[1]
    outlier = rel > (q3 + outlier_factor * (q3 - q1))[:, None]
    order = _stable_desc_order(rel)
    outlier = outlier.scatter(1, order[:, :min_retrieved], True)
    cap = max(0, min(int(retrieval_share * num_kept), num_kept - leave))
    retrieved = torch.zeros_like(outlier)
    if cap == 0:
        return retrieved
    # Outliers and the minimum are both a prefix of the relevance order, so its first `cap`
    # tokens hold every one of them that fits.
    top = order[:, :cap]
    return retrieved.scatter(1, top, outlier.gather(1, top))


def token_space(visual: torch.Tensor, visual_n: torch.Tensor | None, similarity: str) -> torch.Tensor:
    """Unit rows in which visual tokens are compared with each other: the tokens themselves
    ("cosine"; `visual_n` where the caller has them), or the tokens minus their image's mean
    token ("centred"). Normalised a block of rows at a time, so a large image never holds
    more than one float32 copy."""
    if similarity == "cosine":
        return visual_n if visual_n is not None else _unit_rows(visual, None)
    if similarity == "centred":
        return _unit_rows(visual, visual.float().mean(dim=1, keepdim=True))
    raise ValueError(f"similarity must be 'cosine' or 'centred', got {similarity!r}")


def unit_rows(rows: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Rows in float32, less `mean` where given, scaled to unit length: the token space's
    rows, whichever rows and however many are asked for."""
    rows = rows.float()
    return F.normalize(rows if mean is None else rows - mean, dim=-1)


def _unit_rows(visual: torch.Tensor, mean: torch.Tensor | None, block: int = 1024) -> torch.Tensor:
    out = torch.empty(visual.shape, dtype=torch.float32, device=visual.device)
    for start in range(0, visual.shape[1], block):
        out[:, start:start + block] = unit_rows(visual[:, start:start + block], mean)
    return out


def similarities(units: torch.Tensor, panel: int = 256) -> torch.Tensor:
    """units @ unitsᵀ (B x N x N), symmetric: on a CPU, each panel of `panel` rows is
    multiplied with itself and the rows after it only and the rest mirrored, which halves
    the multiplications of the reference's costliest step. On a GPU one product is faster
    than many small launches."""
    num_visual = units.shape[1]
    if units.device.type != "cpu" or num_visual <= panel:
        return units @ units.transpose(1, 2)
    sim = units.new_empty(units.shape[0], num_visual, num_visual)
    for start in range(0, num_visual, panel):
        rows, after = slice(start, start + panel), slice(start + panel, None)
        products = units[:, rows] @ units[:, start:].transpose(1, 2)
        sim[:, rows, start:] = products
        sim[:, after, rows] = products[:, :, panel:].transpose(1, 2)
    return sim


def near_duplicates(sim: torch.Tensor, retrieved: torch.Tensor, threshold: float) -> torch.Tensor:
    """Non-retrieved tokens whose similarity (`sim`, in token_space) to some retrieved token
    exceeds the threshold."""
    # Only the retrieved columns are read (at most K of N), padded to the same count per
    # image with a column whose -inf leaves the max as it is.
    counts = retrieved.sum(dim=-1)
    width = int(counts.max()) if counts.numel() else 0
    if width == 0:
        return torch.zeros_like(retrieved)
    columns = _stable_desc_order(retrieved.to(torch.uint8))[:, :width]  # retrieved first
    to_retrieved = sim.gather(2, columns[:, None, :].expand(-1, sim.shape[1], -1))
    padding = torch.arange(width, device=sim.device)[None, :] >= counts[:, None]
    to_retrieved = to_retrieved.masked_fill_(padding[:, None, :], -math.inf).amax(dim=-1)
    return (to_retrieved > threshold) & ~retrieved


def prompt_weight(rel: torch.Tensor, power: float, prompt_aware: torch.Tensor) -> torch.Tensor:
    """Relevance rescaled to [0, 1] within each image, to `power`: what centre scores are
    multiplied by. Min-max rather than raw cosines because a model's relevance can sit in a
    narrow band (as it does on the accuracy benchmark's model), where exp(r) or r itself
    would barely tell tokens apart. 1 everywhere at power 0, for an image without a prompt
    (its saliency is no prompt to steer by) and where relevance is flat."""
    low = rel.amin(dim=1, keepdim=True)
    span = rel.amax(dim=1, keepdim=True) - low
    steer = prompt_aware[:, None] & (span > 0)
    if power == 0 or not steer.any():
        return torch.ones_like(rel)
    weight = ((rel - low) / span.clamp(min=torch.finfo(rel.dtype).tiny)).pow(power)
    return torch.where(steer, weight, torch.ones_like(rel))


def density_peaks(sim: torch.Tensor, candidates: torch.Tensor, knn_k: int) -> torch.Tensor:
    """DPC-KNN centre score rho * delta over the candidate tokens' cosine kNN graph.

    rho_i = exp(-mean squared distance to its k nearest candidates); delta_i = distance
    to the nearest denser candidate (the densest gets its farthest distance). Distances
    are Euclidean between unit vectors, d^2 = 2 - 2 cos. B x N, 0 off the candidates."""
    num_visual = sim.shape[-1]
    # N x N passes dominate on a CPU: each one is made in place where it can be, masks are
    # added (0 or inf) rather than selected through, and only columns are masked, since a
    # row off the candidates scores 0 whatever its distances (its density only takes a
    # place in the density order, which leaves the candidates' own order as it is).
    off_candidates = torch.zeros_like(sim[..., 0]).masked_fill_(~candidates, math.inf)
    # 2 + inf - 2 cos is inf and 2 + 0 - 2 cos is 2 - 2 cos to the bit, so the columns are
    # masked in the same pass; clamping after it leaves inf as it is.
    dist2 = torch.add(off_candidates[:, None, :] + 2.0, sim, alpha=-2.0).clamp_(min=0.0)
    dist2.diagonal(dim1=1, dim2=2).fill_(math.inf)  # inf off the candidate pairs

    k = min(knn_k, num_visual - 1)
    if k == 0:
        density = torch.ones_like(sim[..., 0])
    else:
        nearest = dist2.topk(k, dim=-1, largest=False).values
        valid = torch.isfinite(nearest)
        mean_d2 = nearest.masked_fill(~valid, 0.0).sum(-1) / valid.sum(-1).clamp(min=1)
        density = torch.exp(-mean_d2)

    # j is denser than i when it comes first in density order; equal densities are ordered
    # by index, so exactly one token is densest.
    order = density.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_visual, device=sim.device).expand_as(order))
    delta2 = dist2.masked_fill_(rank[:, None, :] >= rank[:, :, None], math.inf).amin(dim=-1)
    # A candidate with no denser one (the densest) takes its farthest candidate's distance.
    image, token = (torch.isinf(delta2) & candidates).nonzero(as_tuple=True)
    if image.numel():
        row = (sim[image, token] * -2.0).add_(2.0).clamp_(min=0.0)
        others = candidates[image] & (torch.arange(num_visual, device=sim.device)[None, :] != token[:, None])
        delta2[image, token] = row.masked_fill_(~others, 0.0).amax(dim=-1)
    # sqrt is monotone, so it is taken of the chosen distances only.
    delta = delta2.sqrt()
    return (density * delta).masked_fill(~candidates, 0.0)


def farthest_points(
    sim: torch.Tensor, candidates: torch.Tensor, retrieved: torch.Tensor, rel: torch.Tensor, steps: int,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Centre score by farthest-point sampling: repeatedly pick the candidate whose cosine
    distance to everything picked so far (retrieved tokens included), times its `weight`
    (1 if None), is largest, so centres cover what retrieval did not. Without retrieved
    tokens the most relevant candidate goes first. B x N: steps, steps - 1, ... for the
    picks in order, 0 elsewhere."""
    batch, num_visual = candidates.shape
    rows = torch.arange(batch, device=sim.device)
    distance = 1.0 - sim
    nearest = distance.masked_fill(~retrieved[:, None, :], math.inf).amin(dim=-1)
    # An image with nothing retrieved has every distance inf: seed it by relevance instead.
    seed = torch.isinf(nearest).all(dim=-1, keepdim=True)
    if weight is None:
        weight = torch.ones_like(rel)
    open_ = candidates.clone()
    score = torch.zeros_like(rel)
    for step in range(min(steps, num_visual)):
        key = torch.where(seed, rel, nearest * weight).masked_fill(~open_, -math.inf)
        pick = key.argmax(dim=-1)
        valid = torch.isfinite(key[rows, pick])
        score[rows[valid], pick[valid]] = float(steps - step)
        open_[rows, pick] = False
        nearest = torch.minimum(nearest, distance[rows, pick])
        seed = seed & ~valid[:, None]
    return score


def select_kept(
    rel: torch.Tensor,
    retrieved: torch.Tensor,
    duplicates: torch.Tensor,
    peak_score: torch.Tensor,
    num_kept: int,
) -> torch.Tensor:
    """K representatives per image, ascending: every retrieved token (by relevance), then
    cluster centres by density-peak score; duplicates only if candidates run out."""
    tier = retrieved.long() * 2 + (~retrieved & ~duplicates).long()
    secondary = torch.where(retrieved, rel, peak_score)
    order = _stable_desc_order(secondary)
    order = order.gather(1, _stable_desc_order(tier.gather(1, order)))
    return order[:, :num_kept].sort(dim=1).values


def route(
    sim: torch.Tensor, kept: torch.Tensor, retrieved: torch.Tensor, duplicates: torch.Tensor,
    separate: bool = False,
) -> torch.Tensor:
    """Token routing: near-duplicates of a retrieved token go to their most similar retrieved
    one; every other token to its most similar kept token, or with `separate` to its most
    similar cluster centre (any kept token where there is no centre). Returns B x N
    positions in kept."""
    batch, num_visual = retrieved.shape
    num_kept = kept.shape[1]
    to_kept = sim.gather(2, kept[:, None, :].expand(batch, num_visual, num_kept))
    kept_is_retrieved = retrieved.gather(1, kept)
    closed = duplicates[:, :, None] & ~kept_is_retrieved[:, None, :]
    if separate:
        only_retrieved = kept_is_retrieved.all(dim=-1)
        closed = closed | (~duplicates[:, :, None] & kept_is_retrieved[:, None, :] & ~only_retrieved[:, None, None])
    to_kept = to_kept.masked_fill(closed, -math.inf)
    assignment = to_kept.argmax(dim=-1)
    own = torch.arange(num_kept, device=kept.device).expand(batch, num_kept)
    return assignment.scatter(1, kept, own)


def merge(
    visual: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, assignment: torch.Tensor,
    block: int | None = None,
) -> torch.Tensor:
    """Each kept token becomes the weighted mean of itself and the tokens routed to it.
    Weights are positive, so every output is a convex combination of its members. `block`:
    rows summed at a time (all of them by default)."""
    batch, num_visual, dim = visual.shape
    num_kept = kept.shape[1]
    w = weight.float()
    sums = visual.new_zeros(batch, num_kept, dim, dtype=torch.float32)
    block = block or num_visual
    for start in range(0, num_visual, block):
        rows = slice(start, start + block)
        members_of = assignment[:, rows]
        sums.scatter_add_(1, members_of[..., None].expand(*members_of.shape, dim),
                          visual[:, rows].float() * w[:, rows, None])
    totals = w.new_zeros(batch, num_kept).scatter_add_(1, assignment, w)
    members = torch.zeros_like(totals).scatter_add_(1, assignment, torch.ones_like(w))
    merged = (sums / totals[..., None]).to(visual.dtype)
    # A token nobody merged into stays bit-identical rather than w * v / w.
    alone = visual.gather(1, kept[..., None].expand(batch, num_kept, dim))
    return torch.where(members[..., None] == 1, alone, merged)


def par_reduce(
    visual: torch.Tensor,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    num_kept: int,
    settings: ParSettings,
) -> Reduction:
    """Reduce B images of N visual tokens to K each, guided by their prompts: PAR itself
    (par_vllm.dispatch.reduce_tokens chooses between PAR and a baseline by `settings.method`).

    visual: B x N x D; query: B x T x D prompt-token embeddings (T may be 0);
    query_mask: B x T bool, False on padding."""
    batch, num_visual, _ = visual.shape
    if not 1 <= num_kept:
        raise ValueError(f"num_kept must be >= 1, got {num_kept}")
    if num_kept >= num_visual:
        index = torch.arange(num_visual, device=visual.device).expand(batch, num_visual)
        return Reduction(
            tokens=visual,
            kept_indices=index,
            assignment=index,
            retrieved=torch.zeros(batch, num_visual, dtype=torch.bool, device=visual.device),
            prompt_aware=query_mask.any(dim=-1),
        )

    kernels = use_kernels(visual, settings.backend)
    query_n = F.normalize(query.float(), dim=-1)
    if visual.shape[1] > FULL_MATRIX_MAX and not kernels:
        from .blocked import relevance_blocked  # no N x D copy of a large image

        rel, prompt_aware = relevance_blocked(visual, query_n, query_mask, settings.relevance)
        return reduce_by_relevance(visual, None, rel, prompt_aware, num_kept, settings)
    visual_n = _unit_rows(visual, None)
    if kernels:
        from .kernels import relevance_topk

        prompt_aware = query_mask.any(dim=-1)
        rel = relevance_topk.relevance(visual, query_n, query_mask, settings.relevance)
        rel = torch.where(prompt_aware[:, None], rel, saliency(visual_n))
    else:
        rel, prompt_aware = relevance(visual_n, query_n, query_mask, settings.relevance)
    if visual.shape[1] > FULL_MATRIX_MAX:
        visual_n = None  # the blocked path works from the features: no N x D copy held
    return reduce_by_relevance(visual, visual_n, rel, prompt_aware, num_kept, settings, kernels)


def reduce_by_relevance(
    visual: torch.Tensor,
    visual_n: torch.Tensor | None,
    rel: torch.Tensor,
    prompt_aware: torch.Tensor,
    num_kept: int,
    settings: ParSettings,
    kernels: bool = False,
) -> Reduction:
    """PAR's steps 2-5 (retrieval, clustering, routing, merge) for a given relevance B x N.

    par_reduce feeds it the prompt relevance; diagnostics feed it others (an oracle) to
    tell a relevance failure from a retrieval or routing failure. Images of more than
    FULL_MATRIX_MAX tokens take the same steps a tile at a time (par_vllm/blocked.py)."""
    separate = settings.routing == "separate"
    if visual.shape[1] > FULL_MATRIX_MAX:
        from .blocked import reduce_blocked  # built on this module's steps

        return reduce_blocked(visual, rel, prompt_aware, num_kept, settings)
    # Separate routing sends everything that is not a near-duplicate of a retrieved token
    # to a cluster centre, so it leaves room for one: with every kept token retrieved, the
    # rest of the image would have to merge into them after all.
    retrieved = retrieve(rel, num_kept, settings.outlier_factor, settings.retrieval_share,
                         leave=int(separate), min_retrieved=settings.min_retrieved)
    compared_n = token_space(visual, visual_n, settings.similarity)
    sim = similarities(compared_n)
    duplicates = near_duplicates(sim, retrieved, settings.duplicate_threshold)
    candidates = ~retrieved & ~duplicates
    steer = prompt_weight(rel, settings.centre_relevance, prompt_aware)
    if settings.centres == "farthest_point":
        peaks = farthest_points(sim, candidates, retrieved, rel, num_kept, steer)
    else:
        peaks = density_peaks(sim, candidates, settings.knn_k) * steer
    kept = select_kept(rel, retrieved, duplicates, peaks, num_kept)
    # exp keeps weights positive and monotone in relevance (cosines lie in [-1, 1]).
    weight = torch.exp(rel)
    if kernels:
        from .kernels import route_merge

        tokens, assignment = route_merge.route_merge(visual, compared_n, weight, kept, retrieved, duplicates,
                                               separate)
    else:
        assignment = route(sim, kept, retrieved, duplicates, separate)
        tokens = merge(visual, weight, kept, assignment)
    return Reduction(tokens, kept, assignment, retrieved, prompt_aware, weight)

