"""Baselines at PAR's budget, selectable per request (`par_method`) so that every method
is measured through the same vLLM server. Pruning baselines merge nothing: a token they
drop has assignment -1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .settings import ParSettings
from .reduction import Reduction, relevance, saliency


def pruned(visual: torch.Tensor, kept: torch.Tensor, prompt_aware: torch.Tensor) -> Reduction:
    """The Reduction of keeping exactly the `kept` tokens (B x K, any order) and dropping
    the rest."""
    batch, num_visual, dim = visual.shape
    kept = kept.sort(dim=1).values
    assignment = torch.full((batch, num_visual), -1, dtype=torch.long, device=visual.device)
    own = torch.arange(kept.shape[1], device=visual.device).expand_as(kept)
    return Reduction(
        tokens=visual.gather(1, kept[..., None].expand(-1, -1, dim)),
        kept_indices=kept,
        assignment=assignment.scatter(1, kept, own),
        retrieved=torch.zeros(batch, num_visual, dtype=torch.bool, device=visual.device),
        prompt_aware=prompt_aware,
    )


def uniform_pool(visual, query, query_mask, num_kept, settings, grid: tuple[int, int] | None = None) -> Reduction:
    """2D average pooling of the token grid (`grid` rows x columns; a square one if not
    given) to an h x w grid with h * w = K, the factor pair whose shape is closest to the
    grid's. Token counts with no grid given and no square root pool along the raster order."""
    batch, num_visual, dim = visual.shape
    side = math.isqrt(num_visual)
    if grid is None and side * side == num_visual:
        grid = (side, side)
    if grid is None:
        side_h, side_w, h, w = 1, num_visual, 1, num_kept
    else:
        side_h, side_w = grid
        if side_h * side_w != num_visual:
            raise ValueError(f"a {side_h} x {side_w} grid is not {num_visual} tokens")
        h, w = pooled_shape(num_kept, side_h, side_w)
    image = visual.float().transpose(1, 2).reshape(batch, dim, side_h, side_w)
    tokens = F.adaptive_avg_pool2d(image, (h, w)).reshape(batch, dim, h * w).transpose(1, 2)
    rows = torch.arange(side_h, device=visual.device) * h // side_h
    cols = torch.arange(side_w, device=visual.device) * w // side_w
    cell = (rows[:, None] * w + cols[None, :]).reshape(-1)
    centre_r = ((torch.arange(h, device=visual.device) + 0.5) * side_h / h).long()
    centre_c = ((torch.arange(w, device=visual.device) + 0.5) * side_w / w).long()
    centres = (centre_r[:, None] * side_w + centre_c[None, :]).reshape(-1)
    return Reduction(
        tokens=tokens.to(visual.dtype),
        kept_indices=centres.expand(batch, -1),
        assignment=cell.expand(batch, -1),
        retrieved=torch.zeros(batch, num_visual, dtype=torch.bool, device=visual.device),
        prompt_aware=torch.zeros(batch, dtype=torch.bool, device=visual.device),
    )


def pooled_shape(num_kept: int, rows: int, cols: int) -> tuple[int, int]:
    """(h, w) with h * w = num_kept whose aspect is closest to rows x cols, preferring pairs
    that fit inside the grid, then the flatter one."""
    pairs = [(h, num_kept // h) for h in range(1, num_kept + 1) if num_kept % h == 0]
    aspect = math.log(rows / cols)
    return min(pairs, key=lambda hw: (hw[0] > rows or hw[1] > cols, abs(math.log(hw[0] / hw[1]) - aspect), hw[0]))


def random_keep(visual, query, query_mask, num_kept, settings) -> Reduction:
    """K tokens uniformly at random (fixed seed, so a request is repeatable)."""
    generator = torch.Generator().manual_seed(0)
    kept = torch.stack([torch.randperm(visual.shape[1], generator=generator)[:num_kept]
                        for _ in range(visual.shape[0])]).to(visual.device)
    return pruned(visual, kept, torch.zeros(visual.shape[0], dtype=torch.bool, device=visual.device))


def topk_keep(visual, query, query_mask, num_kept, settings) -> Reduction:
    """The K tokens most relevant to the prompt (PAR's relevance), without routing."""
    visual_n = F.normalize(visual.float(), dim=-1)
    rel, prompt_aware = relevance(visual_n, F.normalize(query.float(), dim=-1), query_mask,
                                  settings.relevance)
    kept = torch.argsort(rel, dim=1, descending=True, stable=True)[:, :num_kept]
    return pruned(visual, kept, prompt_aware)


def diverse_keep(visual, query, query_mask, num_kept, settings) -> Reduction:
    """Prompt-agnostic max-min diversity (DivPrune-style): start from the most salient
    token, then repeatedly keep the token farthest (cosine) from everything kept so far."""
    visual_n = F.normalize(visual.float(), dim=-1)
    batch = visual.shape[0]
    first = saliency(visual_n).argmax(dim=1)
    kept = [first]
    nearest = 1.0 - (visual_n * visual_n[torch.arange(batch), first][:, None]).sum(-1)
    for _ in range(num_kept - 1):
        nxt = nearest.argmax(dim=1)
        kept.append(nxt)
        distance = 1.0 - (visual_n * visual_n[torch.arange(batch), nxt][:, None]).sum(-1)
        nearest = torch.minimum(nearest, distance)
    return pruned(visual, torch.stack(kept, dim=1),
                   torch.zeros(batch, dtype=torch.bool, device=visual.device))


def uniform_frames(frames: int, per_frame: int, num_kept: int) -> torch.Tensor:
    """Uniform frame dropping for a video of `frames` frames of `per_frame` tokens each
    (frame after frame): the ascending indices of its K kept tokens, those of
    ceil(K / per_frame) evenly spaced frames, evenly thinned to K where those hold more."""
    count = min(frames, math.ceil(num_kept / per_frame))
    chosen = ((torch.arange(count) + 0.5) * frames / count).long()  # each the middle of an equal share
    tokens = (chosen[:, None] * per_frame + torch.arange(per_frame)).reshape(-1)
    return tokens[((torch.arange(num_kept) + 0.5) * len(tokens) / num_kept).long()]


BASELINES = {"pool": uniform_pool, "random": random_keep, "topk": topk_keep, "diverse": diverse_keep}


def reduce_with(method: str, visual, query, query_mask, num_kept, settings: ParSettings,
                grid: tuple[int, int] | None = None) -> Reduction:
    """`grid`: the images' token grid (rows, columns), which only pooling reads."""
    if method == "pool":
        return uniform_pool(visual, query, query_mask, num_kept, settings, grid=grid)
    return BASELINES[method](visual, query, query_mask, num_kept, settings)
