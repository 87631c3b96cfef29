"""Routing merge: assign every token to its most similar kept token, then replace each
kept token by the weighted mean of itself and the tokens assigned to it.

Two kernels. `_route_kernel` computes token-to-kept cosines block by block and keeps a
running argmax (ties: the lower kept position, as the reference's argmax); a token marked
as a near-duplicate may only go to a retrieved kept token, and with separate routing no
other token may (unless the image has no cluster centre). `_merge_kernel` reduces each
kept token's members, grouped by a stable sort of the assignment, so every input row is
read once, without atomics, in a deterministic order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    XN, KEPT, KEPT_RETRIEVED, DUPLICATE, RETRIEVED_OPEN, OUT,
    N, K, D,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_base = XN + b * N * D
    duplicate = tl.load(DUPLICATE + b * N + offs_n, mask=n_mask, other=0) != 0
    # Whether tokens that are not near-duplicates may go to a retrieved kept token.
    retrieved_open = tl.load(RETRIEVED_OPEN + b) != 0

    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    best_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        kept = tl.load(KEPT + b * K + offs_k, mask=k_mask, other=0)
        kept_retrieved = tl.load(KEPT_RETRIEVED + b * K + offs_k, mask=k_mask, other=0) != 0
        sim = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            x = tl.load(x_base + offs_n[:, None] * D + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            c = tl.load(x_base + kept[:, None] * D + offs_d[None, :],
                        mask=k_mask[:, None] & d_mask[None, :], other=0.0)
            sim += tl.dot(x, tl.trans(c), input_precision="ieee")
        allowed = (k_mask[None, :] & (kept_retrieved[None, :] | ~duplicate[:, None])
                   & (~kept_retrieved[None, :] | duplicate[:, None] | retrieved_open))
        sim = tl.where(allowed, sim, float("-inf"))
        block_best = tl.max(sim, axis=1)
        block_pos = tl.argmax(sim, axis=1).to(tl.int32) + k0
        better = block_best > best  # strict: an earlier block wins ties
        best = tl.where(better, block_best, best)
        best_pos = tl.where(better, block_pos, best_pos)
    tl.store(OUT + b * N + offs_n, best_pos.to(tl.int64), mask=n_mask)


@triton.jit
def _merge_kernel(
    X, W, ORDER, OFFSETS, KEPT, OUT,
    N, K, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    x_base = X + b * N * D
    start = tl.load(OFFSETS + b * (K + 1) + k)
    end = tl.load(OFFSETS + b * (K + 1) + k + 1)

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    weights = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        member = tl.load(ORDER + b * N + offs_m, mask=m_mask, other=0)
        w = tl.load(W + b * N + member, mask=m_mask, other=0.0)
        x = tl.load(x_base + member[:, None] * D + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * w[:, None], axis=0)
        weights += w
    merged = acc / tl.sum(weights, axis=0)
    # A kept token nobody merged into stays bit-identical (the reference does the same).
    own = tl.load(x_base + tl.load(KEPT + b * K + k) * D + offs_d, mask=d_mask, other=0.0)
    out = tl.where(end - start == 1, own.to(tl.float32), merged)
    tl.store(OUT + (b * K + k) * D + offs_d, out.to(OUT.dtype.element_ty), mask=d_mask)


def route(
    visual_n: torch.Tensor,
    kept: torch.Tensor,
    retrieved: torch.Tensor,
    duplicates: torch.Tensor,
    separate: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """visual_n B x N x D unit rows (float32); kept B x K token indices; retrieved and
    duplicates B x N bool; separate: only near-duplicates go to retrieved tokens (see
    par_vllm.reduction.route). Returns B x N positions in kept (kept tokens map to their own)."""
    batch, num_visual, dim = visual_n.shape
    num_kept = kept.shape[1]
    visual_n = visual_n.to(torch.float32).contiguous()
    kept = kept.contiguous()
    kept_retrieved = retrieved.gather(1, kept)
    retrieved_open = (kept_retrieved.all(dim=1) | (not separate)).to(torch.int8).contiguous()
    kept_retrieved = kept_retrieved.to(torch.int8).contiguous()
    if out is None:
        out = torch.empty(batch, num_visual, dtype=torch.int64, device=visual_n.device)
    block_d = min(64, max(16, triton.next_power_of_2(dim)))
    grid = (batch, triton.cdiv(num_visual, 64))
    _route_kernel[grid](
        visual_n, kept, kept_retrieved, duplicates.to(torch.int8).contiguous(), retrieved_open, out,
        num_visual, num_kept, dim, BLOCK_N=64, BLOCK_K=32, BLOCK_D=block_d,
    )
    own = torch.arange(num_kept, device=kept.device).expand(batch, num_kept)
    return out.scatter(1, kept, own)


def merge(
    visual: torch.Tensor,
    weight: torch.Tensor,
    kept: torch.Tensor,
    assignment: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """B x K x D in visual's dtype: the weight-averaged members of each kept token."""
    batch, num_visual, dim = visual.shape
    num_kept = kept.shape[1]
    order = torch.argsort(assignment, dim=1, stable=True).contiguous()
    counts = torch.zeros(batch, num_kept, dtype=torch.int64, device=visual.device)
    counts.scatter_add_(1, assignment, torch.ones_like(assignment))
    offsets = torch.zeros(batch, num_kept + 1, dtype=torch.int64, device=visual.device)
    offsets[:, 1:] = counts.cumsum(dim=1)
    if out is None:
        out = torch.empty(batch, num_kept, dim, dtype=visual.dtype, device=visual.device)
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    grid = (batch, num_kept, triton.cdiv(dim, block_d))
    _merge_kernel[grid](
        visual.contiguous(), weight.to(torch.float32).contiguous(), order, offsets.contiguous(),
        kept.contiguous(), out, num_visual, num_kept, dim, BLOCK_M=16, BLOCK_D=block_d,
    )
    return out


def route_merge(
    visual: torch.Tensor,
    visual_n: torch.Tensor,
    weight: torch.Tensor,
    kept: torch.Tensor,
    retrieved: torch.Tensor,
    duplicates: torch.Tensor,
    separate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole routing merge: (merged B x K x D, assignment B x N)."""
    assignment = route(visual_n, kept, retrieved, duplicates, separate)
    return merge(visual, weight, kept, assignment), assignment
