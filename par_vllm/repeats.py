"""PAR for a video whose frames mostly repeat: repeats merged first, then PAR's steps on the
distinct tokens only (`par_merge_repeats`, on by default).

PAR compares every token of a clip with every other (clustering, routing), work that grows
as N x N, while most of a clip's tokens are near copies of the token at their place in the
frame pair before (benchmarks/diagnostics/temporal_repeats.py counts them). Here a token at
(t, h, w), t > 0, whose similarity to (t - 1, h, w) in PAR's token space exceeds
`duplicate_threshold` joins that token's run of repeats, whose first token (its root)
stands for the run. PAR then reduces the roots alone, as it would an image of that many
tokens, and each repeat goes where its root went: every kept token is the weighted mean of
the tokens routed to it and of all their repeats. Where K or fewer tokens are roots, all of
them are kept, and so are the repeats that changed most from the frame pair before (each
then the root of the rest of its run), up to K.

Tokens are in Qwen-VL's video order: frame pair by frame pair, each in raster order.
"""

from __future__ import annotations

import math

import torch

from .reduction import Reduction, merge, par_reduce, relevance, token_space
from .settings import ParSettings


def roots(similarity_to_before: torch.Tensor, threshold: float) -> torch.Tensor:
    """(steps - 1) x P similarities of each token to the one at its place one frame pair
    before, to each of the steps x P tokens' root (a flat index): itself where it is no
    repeat (every token of the first frame pair), its predecessor's root otherwise."""
    places = similarity_to_before.shape[1]
    steps = similarity_to_before.shape[0] + 1
    index = torch.arange(steps * places, device=similarity_to_before.device).view(steps, places)
    out = index.clone()
    for step in range(1, steps):
        out[step] = torch.where(similarity_to_before[step - 1] > threshold, out[step - 1], index[step])
    return out.view(-1)


def similarity_to_before(units: torch.Tensor, steps: int) -> torch.Tensor:
    """N x D unit rows (in the token space) to (steps - 1) x P similarities of each token
    to the token at its place one frame pair before."""
    grid = units.view(steps, -1, units.shape[-1])
    return (grid[1:] * grid[:-1]).sum(-1)


def reduce_video(visual: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor, num_kept: int,
                 settings: ParSettings, steps: int) -> Reduction:
    """One video (1 x N x D, `steps` frame pairs of N / steps tokens each) to K tokens:
    par_reduce's Reduction, its indices over all N tokens."""
    num_visual = visual.shape[1]
    if num_kept >= num_visual or steps < 2:
        return par_reduce(visual, query, query_mask, num_kept, settings)
    before = similarity_to_before(token_space(visual, None, settings.similarity)[0], steps)
    root = roots(before, settings.duplicate_threshold)
    distinct = (root == torch.arange(num_visual, device=visual.device)).nonzero().squeeze(1)
    if len(distinct) <= num_kept:
        return _keep_every_root(visual, query, query_mask, num_kept, settings, before, root, distinct)
    reduced = par_reduce(visual[:, distinct], query, query_mask, num_kept, settings)
    # A repeat is a near copy of its root: it goes where the root went, with its weight.
    of_root = _among(distinct, num_visual)[root]
    assignment = reduced.assignment[0, of_root][None]
    weight = reduced.weight[0, of_root][None]
    kept = distinct[reduced.kept_indices[0]][None]
    tokens = merge(visual, weight, kept, assignment)
    retrieved = torch.zeros(1, num_visual, dtype=torch.bool, device=visual.device)
    retrieved[0, distinct] = reduced.retrieved[0]
    return Reduction(tokens, kept, assignment, retrieved, reduced.prompt_aware, weight)


def _among(distinct: torch.Tensor, num_visual: int) -> torch.Tensor:
    """Each of the N tokens' position among the (ascending) distinct ones, -1 for the rest."""
    out = torch.full((num_visual,), -1, dtype=torch.long, device=distinct.device)
    out[distinct] = torch.arange(len(distinct), device=distinct.device)
    return out


def _keep_every_root(visual, query, query_mask, num_kept: int, settings: ParSettings,
                     before: torch.Tensor, root: torch.Tensor, distinct: torch.Tensor) -> Reduction:
    """K or fewer roots: every root kept, and the repeats that changed most from the frame
    pair before (the lowest similarity to it; the earlier first where equal) until K are,
    each the root of the rest of its run."""
    num_visual = visual.shape[1]
    places = before.shape[1]
    extra = num_kept - len(distinct)
    if extra > 0:
        change = before.flatten().clone()
        change[(distinct - places)[distinct >= places]] = math.inf  # already roots
        split = before.clone()
        split.view(-1)[torch.argsort(change, stable=True)[:extra]] = -math.inf
        root = roots(split, settings.duplicate_threshold)
        distinct = (root == torch.arange(num_visual, device=visual.device)).nonzero().squeeze(1)
    assignment = _among(distinct, num_visual)[root][None]
    query_n = torch.nn.functional.normalize(query.float(), dim=-1)
    rel, prompt_aware = relevance(token_space(visual, None, "cosine"), query_n, query_mask, settings.relevance)
    weight = torch.exp(rel)  # as PAR weighs what it merges
    kept = distinct[None]
    tokens = merge(visual, weight, kept, assignment)
    retrieved = torch.zeros(1, num_visual, dtype=torch.bool, device=visual.device)
    return Reduction(tokens, kept, assignment, retrieved, prompt_aware, weight)
