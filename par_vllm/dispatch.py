"""What the model executor calls: images of several requests, each with its own prompt
and settings, batched, reduced by PAR or the baseline the settings name, with the torch
reference standing in for kernels that fail."""

from __future__ import annotations

import logging

import torch

from .baselines import reduce_with
from .reduction import Reduction, merge, par_reduce, use_kernels
from .settings import ParSettings

# Under vLLM's "vllm" logger, whose handler and level vLLM configures (no import of vLLM here).
logger = logging.getLogger("vllm.plugins." + __name__)


def reduce_tokens(
    visual: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor, num_kept: int, settings: ParSettings,
    grid: tuple[int, int] | None = None, steps: int = 1,
) -> Reduction:
    """B images of N tokens to K each by `settings.method`: PAR, or a baseline at the same
    budget. Arguments as par_vllm.reduction.par_reduce; `grid`, the images' token grid
    (rows, columns) where it is not square, for the pooling baseline; `steps`, the frame
    pairs of a video (one item, B = 1), whose repeats PAR merges first under
    `merge_repeats` (par_vllm/repeats.py)."""
    if settings.method == "par" and settings.merge_repeats and steps > 1:
        from .repeats import reduce_video

        return reduce_video(visual, query, query_mask, num_kept, settings, steps)
    if settings.method == "par" or num_kept >= visual.shape[1]:
        return par_reduce(visual, query, query_mask, num_kept, settings)
    return reduce_with(settings.method, visual, query, query_mask, num_kept, settings, grid=grid)


def reduce_per_image(
    features: list[torch.Tensor],
    query_ids: list[torch.Tensor],
    settings: list[ParSettings],
    embed_tokens,
    on_batch=None,
    on_kernel_failure=None,
    score_dims: int | None = None,
    with_kept: bool = False,
    grids: list[tuple[int, int]] | None = None,
    steps: list[int] | None = None,
) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """What the model executor calls: one N_i x D tensor per image (possibly from
    different requests, each with its own prompt and settings) to one K_i x D each.

    `score_dims`: PAR scores, clusters and routes on the first score_dims columns only;
    the others (Qwen3-VL's deepstack features) follow the same selection and merge.
    `with_kept`: return (rows, kept indices) pairs, the indices (ascending) of each output
    row's representative token.
    `grids`: each image's token grid (rows, columns), for images that are not square.
    `steps`: each item's frame pairs (1 for an image), for videos whose repeats PAR merges
    first (`merge_repeats`): each such video is reduced alone.

    Images with the same N and settings are reduced as one batch; prompts are embedded
    with `embed_tokens` (the LLM's own input embedding table) in one call; each batch
    reduced is reported as `on_batch(images, implementation)`. Should the kernels fail on
    a batch, that batch is reduced again by the torch reference and `on_kernel_failure(error)`
    is called: an exception here would stop the engine, and every request in it."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(features)
    groups: dict[tuple, list[int]] = {}
    for i, (feature, setting) in enumerate(zip(features, settings)):
        num_kept = setting.num_kept(feature.shape[0])
        if num_kept >= feature.shape[0]:
            out[i] = (feature, torch.arange(feature.shape[0], device=feature.device))
        else:
            # Only pooling reads the grid: PAR batches images of one N whatever their shape.
            grid = tuple(grids[i]) if grids is not None and setting.method == "pool" else None
            # A video whose repeats merge first is reduced alone (its distinct tokens are its own).
            alone = (i, steps[i]) if steps is not None and steps[i] > 1 and setting.merge_repeats else None
            groups.setdefault((feature.shape, num_kept, setting, grid, alone), []).append(i)

    for (_, num_kept, setting, grid, alone), members in groups.items():
        frame_pairs = alone[1] if alone else 1
        # One image needs no stacked copy: a large one's features are hundreds of MB.
        rows = features[members[0]][None] if len(members) == 1 else torch.stack([features[i] for i in members])
        visual, carried = (rows, None) if score_dims is None else (rows[..., :score_dims], rows[..., score_dims:])
        ids = [query_ids[i].to(visual.device) for i in members]
        lengths = [len(q) for q in ids]
        query = visual.new_zeros(len(members), max(lengths), visual.shape[-1])
        if max(lengths) > 0:
            embedded = embed_tokens(torch.cat(ids)).to(visual.dtype)
            query = torch.nn.utils.rnn.pad_sequence(list(embedded.split(lengths)), batch_first=True)
        query_mask = torch.arange(query.shape[1], device=visual.device)[None, :] < torch.tensor(
            lengths, device=visual.device
        )[:, None]
        kernels = setting.method == "par" and use_kernels(visual, setting.backend)
        try:
            reduced = reduce_tokens(visual, query, query_mask, num_kept, setting, grid=grid, steps=frame_pairs)
        except Exception as error:
            if not kernels:
                raise
            logger.warning("PAR's Triton kernels failed on a batch of %d images; reducing it with "
                           "the torch reference instead", len(members), exc_info=True)
            if on_kernel_failure is not None:
                on_kernel_failure(error)
            kernels = False
            reduced = reduce_tokens(visual, query, query_mask, num_kept, setting.model_copy(update={"backend": "torch"}),
                                    steps=frame_pairs)
        if on_batch is not None:
            on_batch(len(members), "triton" if kernels else "torch")
        tokens = reduced.tokens if carried is None else torch.cat([reduced.tokens, carry(reduced, carried)], dim=-1)
        for row, i in enumerate(members):
            out[i] = (tokens[row], reduced.kept_indices[row])
    return out if with_kept else [rows for rows, _ in out]


def carry(reduced: Reduction, columns: torch.Tensor) -> torch.Tensor:
    """B x N x E columns that were not scored, reduced as the scored ones were: each output
    row's the weighted mean of the rows merged into it (uniform where the method gave no
    weights), or its kept token's where nothing was merged."""
    if bool((reduced.assignment < 0).any()):  # a pruning baseline: kept rows only
        return columns.gather(1, reduced.kept_indices[..., None].expand(-1, -1, columns.shape[-1]))
    weight = reduced.weight if reduced.weight is not None else torch.ones(reduced.assignment.shape,
                                                                         device=columns.device)
    return merge(columns, weight, reduced.kept_indices, reduced.assignment)
