"""PAR's pairwise steps for large images, a block of rows at a time: no N x N matrix.

reduction.py compares every visual token with every other through N x N similarity
matrices (its density-peak step holds several), which is clear and fine at LLaVA's 576
tokens but gigabytes at the 16,384 a large Qwen2.5-VL image has. Here the same steps read
only what they need: the similarities to the retrieved tokens (near-duplicates) or to the
kept ones (routing), N x R and N x K, in row blocks; and for density peaks, one pass over
row blocks that keeps each candidate's nearest candidates, from which most tokens' nearest
denser neighbour is read exactly (the rest, the local density maxima, get their full row
again). Memory grows with N x block, not N x N; the one N x D float32 copy of the tokens
in the space they are compared in remains.

The answers are the reference's: tests compare the two on images both can reduce, with
ties and blocks that leave many tokens to the second pass, and find the same kept tokens,
routing and merged tokens bit for bit. That holds where the matrix library rounds a
block's products as it rounds the whole product's, as it does for blocks of 64 rows and
more on the CPUs tested here; elsewhere a last-bit difference could break a near-tie the
other way.
"""

from __future__ import annotations

import math

import torch

from .reduction import Reduction, merge, prompt_weight, retrieve, select_kept
from .settings import ParSettings

# Above this many visual tokens an image takes this path (reduction.reduce_by_relevance).
FULL_MATRIX_MAX = 4096
# Rows of similarities held at a time.
BLOCK_ROWS = 256
# Nearest candidates kept per token in the density pass: enough that almost every token
# finds a denser one among them.
NEIGHBOURS = 32


def _blocks(count: int, block: int):
    for start in range(0, count, block):
        yield slice(start, min(start + block, count))


def similarities(compared: torch.Tensor, rows, targets: torch.Tensor, block: int) -> torch.Tensor:
    """compared[rows] @ targets, always as a product of `block` rows (a short last block
    padded): a matrix library may round products of different shapes differently in the
    last bit, and two identical tokens must get identical similarities wherever they fall,
    or their tie would be broken by rounding instead of by index."""
    picked = compared[rows]
    short = block - picked.shape[0]
    if short > 0:
        picked = torch.cat([picked, picked[-1:].expand(short, -1)])
    return (picked @ targets)[:block - short]


def to_columns(compared: torch.Tensor, columns: torch.Tensor, block: int, reduce) -> torch.Tensor:
    """reduce(rows' similarities to `columns`, row slice) for each row block, concatenated:
    never more than block x len(columns) similarities at once."""
    targets = compared[columns].T
    return torch.cat([reduce(similarities(compared, rows, targets, block), rows)
                      for rows in _blocks(compared.shape[0], block)])


def near_duplicates(compared: torch.Tensor, retrieved: torch.Tensor, threshold: float, block: int) -> torch.Tensor:
    """reduction.near_duplicates for one image (N x D unit rows, N retrieved flags)."""
    columns = retrieved.nonzero().squeeze(1)
    if columns.numel() == 0:
        return torch.zeros_like(retrieved)
    to_retrieved = to_columns(compared, columns, block, lambda sim, rows: sim.amax(dim=-1))
    return (to_retrieved > threshold) & ~retrieved


def nearest_candidates(compared: torch.Tensor, candidates: torch.Tensor, knn_k: int, block: int,
                       neighbours: int | None = None):
    """Density-peak pass 1 for one image: each candidate's `neighbours` (NEIGHBOURS) nearest
    candidates (squared distances, ascending, inf where there are fewer; and their indices),
    and its mean squared distance to the k nearest (0 off the candidates)."""
    num_visual = compared.shape[0]
    k = min(knn_k, num_visual - 1)
    listed = min(max(neighbours or NEIGHBOURS, k), num_visual)
    mean_d2 = torch.zeros(num_visual, dtype=torch.float32, device=compared.device)
    near_d2 = torch.full((num_visual, listed), math.inf, device=compared.device)
    near_index = torch.zeros((num_visual, listed), dtype=torch.long, device=compared.device)
    rows_of = candidates.nonzero().squeeze(1)
    for part in _blocks(rows_of.numel(), block):
        rows = rows_of[part]
        nearest = _distances2(compared, candidates, rows, block).topk(listed, dim=-1, largest=False)
        near_d2[rows], near_index[rows] = nearest.values, nearest.indices
        if k > 0:
            first = nearest.values[:, :k]
            valid = torch.isfinite(first)
            mean_d2[rows] = first.masked_fill(~valid, 0.0).sum(-1) / valid.sum(-1).clamp(min=1)
    return mean_d2, near_d2, near_index


def _distances2(compared: torch.Tensor, candidates: torch.Tensor, rows: torch.Tensor, block: int) -> torch.Tensor:
    """Squared distances from `rows` to every token, inf off the candidates and to itself."""
    index = torch.arange(compared.shape[0], device=compared.device)
    dist2 = (2.0 - 2.0 * similarities(compared, rows, compared.T, block)).clamp(min=0.0)
    pair = candidates[None, :] & (index[None, :] != rows[:, None])
    return dist2.masked_fill(~pair, math.inf)


def nearest_denser(compared: torch.Tensor, candidates: torch.Tensor, density: torch.Tensor,
                   near_d2: torch.Tensor, near_index: torch.Tensor, block: int) -> torch.Tensor:
    """Density-peak delta for one image: each candidate's distance to its nearest denser
    candidate (equal densities: the lower index is denser), its farthest distance for the
    densest; 0 off the candidates. Where a denser candidate is listed, the nearest denser of
    all is listed too, since every candidate nearer than the last listed one is listed; the
    rest (local maxima) get their whole row again."""
    num_visual = compared.shape[0]
    index = torch.arange(num_visual, device=compared.device)

    def denser(rows: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        d_rows, d_others = density[rows][:, None], density[others]
        return (d_others > d_rows) | ((d_others == d_rows) & (others < rows[:, None]))

    rows_of = candidates.nonzero().squeeze(1)
    listed_denser = denser(rows_of, near_index[rows_of]) & torch.isfinite(near_d2[rows_of])
    delta = torch.zeros(num_visual, dtype=torch.float32, device=compared.device)
    delta[rows_of] = near_d2[rows_of].sqrt().masked_fill(~listed_denser, math.inf).amin(dim=-1)
    again = rows_of[torch.isinf(delta[rows_of])]
    for part in _blocks(again.numel(), block):
        rows = again[part]
        dist2 = _distances2(compared, candidates, rows, block)
        pair = torch.isfinite(dist2)
        dist = dist2.masked_fill(~pair, 0.0).sqrt()
        others = index[None, :].expand(rows.numel(), num_visual)
        nearest = dist.masked_fill(~(denser(rows, others) & pair), math.inf).amin(dim=-1)
        farthest = dist.masked_fill(~pair, 0.0).amax(dim=-1)
        delta[rows] = torch.where(torch.isinf(nearest), farthest, nearest)
    return delta


def farthest_points(compared: torch.Tensor, candidates: torch.Tensor, retrieved: torch.Tensor,
                    rel: torch.Tensor, steps: int, weight: torch.Tensor, block: int) -> torch.Tensor:
    """reduction.farthest_points for one image, reading one row of similarities per pick."""
    num_visual = candidates.shape[0]
    columns = retrieved.nonzero().squeeze(1)
    if columns.numel():
        nearest = to_columns(compared, columns, block, lambda sim, rows: (1.0 - sim).amin(dim=-1))
    else:
        nearest = torch.full((num_visual,), math.inf, device=compared.device)
    seed = bool(torch.isinf(nearest).all())
    open_ = candidates.clone()
    score = torch.zeros_like(rel)
    for step in range(min(steps, num_visual)):
        key = (rel if seed else nearest * weight).masked_fill(~open_, -math.inf)
        pick = int(key.argmax())
        if not math.isfinite(float(key[pick])):
            continue
        score[pick] = float(steps - step)
        open_[pick] = False
        nearest = torch.minimum(nearest, 1.0 - (compared[pick:pick + 1] @ compared.T)[0])
        seed = False
    return score


def route(compared: torch.Tensor, kept: torch.Tensor, retrieved: torch.Tensor, duplicates: torch.Tensor,
          separate: bool, block: int) -> torch.Tensor:
    """reduction.route for one image."""
    kept_is_retrieved = retrieved[kept]
    only_retrieved = bool(kept_is_retrieved.all())

    def assign(sim: torch.Tensor, rows: slice) -> torch.Tensor:
        duplicate = duplicates[rows][:, None]
        closed = duplicate & ~kept_is_retrieved[None, :]
        if separate and not only_retrieved:
            closed = closed | (~duplicate & kept_is_retrieved[None, :])
        return sim.masked_fill(closed, -math.inf).argmax(dim=-1)

    assignment = to_columns(compared, kept, block, assign)
    return assignment.scatter(0, kept, torch.arange(kept.numel(), device=kept.device))


def reduce_blocked(visual, compared_n, rel, prompt_aware, num_kept: int, settings: ParSettings,
                   block: int | None = None) -> Reduction:
    """reduction.reduce_by_relevance's steps for B images (B x N x D, their unit rows in
    token space, B x N relevances), the pairwise ones image by image in row blocks. Steps
    with no pairs (retrieval, weights, densities, selection, merge) run on the whole batch
    as the reference runs them, so their floating-point results are the reference's."""
    block = block or BLOCK_ROWS
    images = range(visual.shape[0])
    separate = settings.routing == "separate"
    retrieved = retrieve(rel, num_kept, settings.outlier_factor, settings.retrieval_share,
                         leave=int(separate), min_retrieved=settings.min_retrieved)
    duplicates = torch.stack([near_duplicates(compared_n[b], retrieved[b], settings.duplicate_threshold, block)
                              for b in images])
    candidates = ~retrieved & ~duplicates
    steer = prompt_weight(rel, settings.centre_relevance, prompt_aware)
    if settings.centres == "farthest_point":
        peaks = torch.stack([farthest_points(compared_n[b], candidates[b], retrieved[b], rel[b], num_kept,
                                             steer[b], block) for b in images])
    else:
        listed = [nearest_candidates(compared_n[b], candidates[b], settings.knn_k, block) for b in images]
        density = torch.exp(-torch.stack([mean_d2 for mean_d2, _, _ in listed]))
        delta = torch.stack([nearest_denser(compared_n[b], candidates[b], density[b], near_d2, near_index, block)
                             for b, (_, near_d2, near_index) in zip(images, listed)])
        peaks = (density * delta).masked_fill(~candidates, 0.0) * steer
    kept = select_kept(rel, retrieved, duplicates, peaks, num_kept)
    assignment = torch.stack([route(compared_n[b], kept[b], retrieved[b], duplicates[b], separate, block)
                              for b in images])
    tokens = merge(visual, torch.exp(rel), kept, assignment, block)
    return Reduction(tokens, kept, assignment, retrieved, prompt_aware)
