"""Relevance + top-k: r_i = max (or mean) over prompt tokens j of cos(v_i, q_j).

One pass over the visual tokens, which dominate the traffic (576 x 4096 bf16 is 4.7 MB
per image; a prompt is a few KB): each program reads a block of tokens once per block of
prompt tokens (once in all for T <= 64), accumulating the dot products and the tokens'
squared norms together in float32 (IEEE, no TF32) so the result matches the reference.
Selecting k of N floats afterwards is a stable sort (lower index first on ties, the
reference's rule) over B x N values, negligible beside the pass over B x N x D.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _relevance_kernel(
    V, Q, MASK, OUT,
    N, T, D,
    MEAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    v_base = V + b * N * D
    q_base = Q + b * T * D

    if MEAN:
        score = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        score = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    count = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = tl.load(MASK + b * T + offs_t, mask=offs_t < T, other=0) != 0
        count += t_mask.to(tl.float32)
        dots = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            v = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            q = tl.load(q_base + offs_t[:, None] * D + offs_d[None, :],
                        mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            dots += tl.dot(v, tl.trans(q), input_precision="ieee")
            sq += tl.sum(v * v, axis=1)
        cos = dots / tl.maximum(tl.sqrt(sq), 1e-12)[:, None]
        if MEAN:
            score += tl.sum(tl.where(t_mask[None, :], cos, 0.0), axis=1)
        else:
            score = tl.maximum(score, tl.max(tl.where(t_mask[None, :], cos, float("-inf")), axis=1))
    if MEAN:
        score = score / tl.maximum(tl.sum(count, axis=0), 1.0)
    tl.store(OUT + b * N + offs_n, score, mask=n_mask)


def relevance(
    visual: torch.Tensor,
    query_n: torch.Tensor,
    query_mask: torch.Tensor,
    reduce: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """visual B x N x D (any float dtype); query_n B x T x D, unit rows; query_mask B x T
    bool, False on padding (anywhere). Returns B x N float32; rows with no prompt token are
    -inf (max) or 0 (mean): the caller substitutes its prompt-agnostic fallback there."""
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    batch, num_visual, dim = visual.shape
    visual = visual.contiguous()
    query_n = query_n.to(torch.float32).contiguous()
    query_mask = query_mask.to(device=visual.device, dtype=torch.int8).contiguous()
    if out is None:
        out = torch.empty(batch, num_visual, dtype=torch.float32, device=visual.device)
    block_n = 64
    block_t = min(64, max(16, triton.next_power_of_2(max(query_n.shape[1], 1))))
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    grid = (batch, triton.cdiv(num_visual, block_n))
    _relevance_kernel[grid](
        visual, query_n, query_mask, out, num_visual, query_n.shape[1], dim,
        MEAN=reduce == "mean", BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return out


def relevance_topk(
    visual: torch.Tensor, query_n: torch.Tensor, query_mask: torch.Tensor, reduce: str, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance (B x N float32) and the indices of the k most relevant tokens per image
    (B x k, most relevant first, lower index first on ties)."""
    rel = relevance(visual, query_n, query_mask, reduce)
    order = torch.argsort(rel, dim=-1, descending=True, stable=True)
    return rel, order[:, :k]
