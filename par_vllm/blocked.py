"""PAR's pairwise steps for large images, a tile at a time: no N x N matrix.

reduction.py compares every visual token with every other through N x N similarity
matrices (its density-peak step holds several), which is clear and fine at LLaVA's 576
tokens but gigabytes at the 16,384 a large Qwen2.5-VL image has. Here the same steps read
similarities a tile (block x block) at a time, computed from the features as they are
needed, so memory grows with a block of rows (block x N at most), not with N x N or even
N x D:
- near-duplicates and routing compare every token with the retrieved or the kept tokens
  only (R or K columns);
- density peaks take one pass that keeps each candidate's nearest candidates (a panel of
  candidates against a tile of candidates at a time, each pair of tiles once for its rows
  and its columns);
  most tokens' nearest denser neighbour is among them, exactly (every candidate nearer
  than the last one listed is listed), and only the rest, the local density maxima, are
  compared with every token again.

The answers are the reference's: tests compare the two on images both can reduce, with
ties and blocks that leave many tokens to the second pass, and find the same kept tokens,
routing and merged tokens bit for bit. That holds where the matrix library rounds a
tile's products as it rounds the whole product's, as it does for tiles of 64 rows and
more on the CPUs tested here; elsewhere a last-bit difference could break a near-tie the
other way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reduction import (
    Reduction,
    merge,
    prompt_weight,
    relevance,
    retrieve,
    select_kept,
    unit_rows,
)
from .settings import ParSettings

# Rows (and columns) of similarities computed at a time.
BLOCK = 256
# Nearest candidates kept per token in the density pass. A token with no denser one among
# them is compared with every token again; a longer list leaves fewer such tokens but makes
# merging each tile into the lists, the pass's costliest step besides its products, dearer
# (benchmarks/par_cost.py).
NEIGHBOURS = 8
# The density pass's tiles are this many blocks wide: merging a tile into its rows' lists
# costs less per similarity the more columns a row brings at once (a top-k over a row of
# under 64 x NEIGHBOURS values takes torch's slower selection on a CPU).
DENSITY_TILE_BLOCKS = 2
# Tiles of rows that meet each column tile in one product in the density pass.
PANEL = 2


def _blocks(count: int, block: int):
    for start in range(0, count, block):
        yield slice(start, min(start + block, count))


def _padded(rows: torch.Tensor, block: int) -> torch.Tensor:
    """Rows padded (by repeating the last) to a multiple of `block`: every product then has
    the same shape, and a matrix library that rounds products of different shapes
    differently in the last bit cannot give two identical tokens different similarities."""
    short = -rows.shape[0] % block
    return torch.cat([rows, rows[-1:].expand(short, -1)]) if short else rows


class Space:
    """One image's tokens as unit rows in the space they are compared in
    (reduction.token_space), computed for the rows asked for, never all at once."""

    def __init__(self, visual: torch.Tensor, mean: torch.Tensor | None, block: int):
        self.visual, self.mean, self.block = visual, mean, block
        self.size = visual.shape[0]

    def units(self, index) -> torch.Tensor:
        return unit_rows(self.visual[index], self.mean)

    def row_tiles(self, rows: torch.Tensor):
        """(column slice, similarities of `rows` to those columns) over every column tile."""
        units = _padded(self.units(rows), self.block)
        for columns in _blocks(self.size, self.block):
            targets = _padded(self.units(columns), self.block).T
            yield columns, (units @ targets)[:rows.numel(), :columns.stop - columns.start]

    def to_columns(self, columns: torch.Tensor, reduce, rows: torch.Tensor | None = None) -> torch.Tensor:
        """reduce(similarities of a block of rows to `columns`), over every row block of
        `rows` (all rows by default)."""
        targets = _padded(self.units(columns), self.block).T
        out = []
        for part in _blocks(self.size if rows is None else rows.numel(), self.block):
            index = part if rows is None else rows[part]
            sim = (_padded(self.units(index), self.block) @ targets)[:part.stop - part.start, :columns.numel()]
            out.append(reduce(sim))
        return torch.cat(out)


def near_duplicates(space: Space, retrieved: torch.Tensor, threshold: float) -> torch.Tensor:
    """reduction.near_duplicates for one image."""
    columns = retrieved.nonzero().squeeze(1)
    if columns.numel() == 0:
        return torch.zeros_like(retrieved)
    to_retrieved = space.to_columns(columns, lambda sim: sim.amax(dim=-1))
    return (to_retrieved > threshold) & ~retrieved


def nearest_candidates(space: Space, candidates: torch.Tensor, knn_k: int, neighbours: int | None = None):
    """Density-peak pass 1 for one image: each candidate's `neighbours` (NEIGHBOURS) nearest
    candidates (squared distances ascending, inf where there are fewer; their indices), and
    its mean squared distance to the k nearest (0 off the candidates)."""
    device = candidates.device
    k = min(knn_k, space.size - 1)
    listed = min(max(neighbours or NEIGHBOURS, k), space.size)
    mean_d2 = torch.zeros(space.size, dtype=torch.float32, device=device)
    near_d2 = torch.full((space.size, listed), math.inf, device=device)
    near_index = torch.zeros((space.size, listed), dtype=torch.long, device=device)
    rows_of = candidates.nonzero().squeeze(1)
    # Candidates against candidates only (every other pair is inf), and each tile of that
    # symmetric matrix computed once: it lists neighbours for its rows, and transposed for
    # its columns' rows. Which of equally near neighbours a row lists may differ from the
    # reference's; its densities and deltas cannot (nearest_denser). The lists hold
    # similarities, the largest first: squared distances, 2 - 2 cos clamped at 0, fall as
    # similarities rise, so the most similar give the nearest distances, the same values
    # in the same order, and only the listed ones are turned into distances.
    best_sim = torch.full((rows_of.numel(), listed), -math.inf, device=device)
    best_at = torch.zeros((rows_of.numel(), listed), dtype=torch.long, device=device)
    tile = DENSITY_TILE_BLOCKS * space.block
    parts = list(_blocks(rows_of.numel(), tile))
    # A panel of PANEL row tiles meets each column tile from its own first one on in one
    # product, the same shape every time (padded): fewer, larger products, and each column
    # tile's unit rows computed once a panel rather than once a row tile.
    for first in range(0, len(parts), PANEL):
        rows = slice(parts[first].start, parts[min(first + PANEL, len(parts)) - 1].stop)
        panel_units = _padded(space.units(rows_of[rows]), PANEL * tile)
        for other in parts[first:]:
            before, width = other.start - rows.start, other.stop - other.start
            inside = other.start < rows.stop
            # A tile of the panel's own has its unit rows (padded as _padded pads) in the panel's.
            other_units = (panel_units[before:before + tile] if inside
                           else _padded(space.units(rows_of[other]), tile))
            sims = panel_units @ other_units.T
            if inside:
                # One of the panel's own tiles: it takes in the rows before it (first, as
                # the lower indices), then its rows and those before it take it in; rows
                # after it meet it as columns later.
                sim = sims[:before + width, :width]
                sim[before:].fill_diagonal_(-math.inf)
                if before:
                    _keep_nearest(best_sim, best_at, other, sim[:before].T, rows.start)
                _keep_nearest(best_sim, best_at, slice(rows.start, other.stop), sim, other.start)
            else:
                sim = sims[:rows.stop - rows.start, :width]
                _keep_nearest(best_sim, best_at, rows, sim, other.start)
                _keep_nearest(best_sim, best_at, other, sim.T, rows.start)
    best_d2 = _squared_distance(best_sim)
    near_d2[rows_of], near_index[rows_of] = best_d2, rows_of[best_at]
    if k > 0:
        first_k = best_d2[:, :k]
        valid = torch.isfinite(first_k)
        mean_d2[rows_of] = first_k.masked_fill(~valid, 0.0).sum(-1) / valid.sum(-1).clamp(min=1)
    return mean_d2, near_d2, near_index


def _keep_nearest(best_sim: torch.Tensor, best_at: torch.Tensor, rows: slice, sim: torch.Tensor, first: int) -> None:
    """Merge a tile's similarities (columns `first`, `first` + 1, ...) into `rows`' most
    similar so far, in place, largest first."""
    listed = best_sim.shape[1]
    # Of equal similarities the list should keep those it has: candidates arrive about in
    # index order, and a run of identical tokens (a flat region, a still part of a video)
    # then lists its lower-indexed copies, the denser among equal densities, and needs no
    # second pass. torch's top-k on a CPU keeps the earlier of equal values in the partial
    # sort it takes for rows of 64 x k values or more, so a shorter row is padded to that.
    width, short = sim.shape[1], 64 * listed - listed - sim.shape[1]
    if short > 0:
        sim = torch.cat([sim, sim.new_full((sim.shape[0], short), -math.inf)], dim=1)
    best, order = torch.cat([best_sim[rows], sim], dim=1).topk(listed, dim=-1)
    listed_before = best_at[rows].gather(1, order.clamp(max=listed - 1))
    # A padding column taken (an -inf, where a row has fewer candidates than it lists) is
    # given a real column's index: inf distances are never read as neighbours.
    from_tile = (order - listed).clamp(max=width - 1) + first
    best_sim[rows], best_at[rows] = best, torch.where(order < listed, listed_before, from_tile)


def nearest_denser(space: Space, candidates: torch.Tensor, density: torch.Tensor,
                   near_d2: torch.Tensor, near_index: torch.Tensor) -> torch.Tensor:
    """Density-peak delta for one image: each candidate's distance to its nearest denser
    candidate (equal densities: the lower index is denser), its farthest distance for the
    densest; 0 off the candidates."""
    rows_of = candidates.nonzero().squeeze(1)
    # j is denser than i when it comes before i in the reference's density order; a token
    # off the candidates is never denser.
    order = rows_of[density[rows_of].sort(descending=True, stable=True).indices]
    rank = torch.full((space.size,), space.size, dtype=torch.long, device=candidates.device)
    rank[order] = torch.arange(order.numel(), device=candidates.device)
    listed_denser = (rank[near_index[rows_of]] < rank[rows_of][:, None]) & torch.isfinite(near_d2[rows_of])
    delta = torch.zeros(space.size, dtype=torch.float32, device=candidates.device)
    delta[rows_of] = near_d2[rows_of].sqrt().masked_fill(~listed_denser, math.inf).amin(dim=-1)
    # The local maxima: no denser candidate listed, so compare with every token. Distances
    # fall as similarities rise (2 - 2 cos, clamped, then its root), so the most similar
    # denser token gives the nearest distance, the reference's to the bit. The densest, one
    # of them, has no denser candidate and takes its least similar other candidate instead.
    again = rows_of[torch.isinf(delta[rows_of])]
    densest = order[:1]
    for part in _blocks(again.numel(), PANEL * DENSITY_TILE_BLOCKS * space.block):
        rows = again[part]
        most_similar = torch.full((rows.numel(),), -math.inf, device=candidates.device)
        least_similar = torch.full((rows.numel(),), math.inf, device=candidates.device)
        is_densest = rows == densest
        at = int(is_densest.nonzero()[0]) if is_densest.any() else None
        for columns, sim in space.row_tiles(rows):
            if at is not None:
                others = candidates[columns] & (torch.arange(columns.start, columns.stop, device=sim.device) != densest)
                least_similar[at] = torch.minimum(least_similar[at], sim[at].masked_fill(~others, math.inf).amin())
            not_denser = rank[columns][None, :] >= rank[rows][:, None]
            most_similar = torch.maximum(most_similar, sim.masked_fill_(not_denser, -math.inf).amax(dim=-1))
        # With no other candidate the densest's least similar stays inf: distance 0.
        delta[rows] = _distance(torch.where(is_densest, least_similar, most_similar))
    return delta


def _squared_distance(sim: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance between unit rows of cosine `sim`, 2 - 2 cos clamped at
    0, as the reference rounds it (inf for -inf, 0 for inf)."""
    return (2.0 - 2.0 * sim).clamp(min=0.0)


def _distance(sim: torch.Tensor) -> torch.Tensor:
    return _squared_distance(sim).sqrt()


def farthest_points(space: Space, candidates: torch.Tensor, retrieved: torch.Tensor,
                    rel: torch.Tensor, steps: int, weight: torch.Tensor) -> torch.Tensor:
    """reduction.farthest_points for one image. Each pick reads one row of similarities, so
    this experimental path holds the image's unit rows whole (N x D)."""
    num_visual = candidates.shape[0]
    columns = retrieved.nonzero().squeeze(1)
    if columns.numel():
        nearest = space.to_columns(columns, lambda sim: (1.0 - sim).amin(dim=-1))
    else:
        nearest = torch.full((num_visual,), math.inf, device=candidates.device)
    units = space.units(slice(0, num_visual))
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
        nearest = torch.minimum(nearest, 1.0 - (units[pick:pick + 1] @ units.T)[0])
        seed = False
    return score


def route(space: Space, kept: torch.Tensor, retrieved: torch.Tensor, duplicates: torch.Tensor,
          separate: bool) -> torch.Tensor:
    """reduction.route for one image. Each token is compared with the kept tokens it may
    join only, rather than with all of them and the rest masked: fewer products, and the
    same answer, since those columns keep their order (ties go to the first)."""
    kept_is_retrieved = retrieved[kept]
    position = torch.arange(kept.numel(), device=kept.device)
    open_to_others = (position[~kept_is_retrieved] if separate and not bool(kept_is_retrieved.all())
                      else position)
    # A near-duplicate of a retrieved token joins a retrieved one; any other token, a centre
    # under separate routing (any kept token where all are retrieved), else any kept token.
    groups = (((~duplicates).nonzero().squeeze(1), open_to_others),
              (duplicates.nonzero().squeeze(1), position[kept_is_retrieved]))
    assignment = torch.empty(space.size, dtype=torch.long, device=kept.device)
    for rows, open_ in groups:
        if rows.numel():
            assignment[rows] = open_[space.to_columns(kept[open_], lambda sim: sim.argmax(dim=-1), rows)]
    return assignment.scatter(0, kept, position)


def reduce_blocked(visual: torch.Tensor, rel: torch.Tensor, prompt_aware: torch.Tensor, num_kept: int,
                   settings: ParSettings, block: int | None = None) -> Reduction:
    """reduction.reduce_by_relevance for B images (B x N x D), the pairwise steps image by
    image in tiles. Steps without pairs (retrieval, weights, densities, selection, merge)
    run on the whole batch as the reference runs them, so their floating-point results
    are the reference's too."""
    block = block or BLOCK
    images = range(visual.shape[0])
    mean = visual.float().mean(dim=1, keepdim=True) if settings.similarity == "centred" else [None] * len(images)
    spaces = [Space(visual[b], mean[b], block) for b in images]
    separate = settings.routing == "separate"
    retrieved = retrieve(rel, num_kept, settings.outlier_factor, settings.retrieval_share,
                         leave=int(separate), min_retrieved=settings.min_retrieved)
    duplicates = torch.stack([near_duplicates(spaces[b], retrieved[b], settings.duplicate_threshold)
                              for b in images])
    candidates = ~retrieved & ~duplicates
    steer = prompt_weight(rel, settings.centre_relevance, prompt_aware)
    if settings.centres == "farthest_point":
        peaks = torch.stack([farthest_points(spaces[b], candidates[b], retrieved[b], rel[b], num_kept, steer[b])
                             for b in images])
    else:
        listed = [nearest_candidates(spaces[b], candidates[b], settings.knn_k) for b in images]
        density = torch.exp(-torch.stack([mean_d2 for mean_d2, _, _ in listed]))
        delta = torch.stack([nearest_denser(spaces[b], candidates[b], density[b], near_d2, near_index)
                             for b, (_, near_d2, near_index) in zip(images, listed)])
        peaks = (density * delta).masked_fill(~candidates, 0.0) * steer
    kept = select_kept(rel, retrieved, duplicates, peaks, num_kept)
    assignment = torch.stack([route(spaces[b], kept[b], retrieved[b], duplicates[b], separate) for b in images])
    weight = torch.exp(rel)
    tokens = merge(visual, weight, kept, assignment, block)
    return Reduction(tokens, kept, assignment, retrieved, prompt_aware, weight)


def relevance_blocked(visual: torch.Tensor, query_n: torch.Tensor, query_mask: torch.Tensor, reduce: str,
                      block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """reduction.relevance for B x N x D features, normalised a block of rows at a time, so
    no N x D copy is held. Equal to the reference up to float rounding: the image's mean
    unit token is summed by blocks."""
    block = 4 * (block or BLOCK)
    num_visual = visual.shape[1]
    total = sum(unit_rows(visual[:, rows]).sum(dim=1, keepdim=True) for rows in _blocks(num_visual, block))
    mean = F.normalize(total / num_visual, dim=-1)
    parts = [relevance(unit_rows(visual[:, rows]), query_n, query_mask, reduce, mean)
             for rows in _blocks(num_visual, block)]
    return torch.cat([rel for rel, _ in parts], dim=1), parts[0][1]
