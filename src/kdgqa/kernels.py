"""One Triton launch for the whole key-driven allocation on CUDA.

In eager mode the allocation written as tensor ops is ~25 tiny kernels per layer, and at ViT
shapes their launch overhead costs more than the attention itself. This kernel does the batch
reduction of the key norms, the largest-remainder apportionment and the head map in a single
program per row. It is registered as a ``torch.library`` Triton op, so ``torch.compile``
traces it like any other op. Where Triton or CUDA is missing, callers use the tensor-op
version in ``kdgqa.allocation`` instead, which computes the same thing.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

__all__ = ["apportion_triton", "triton_available"]

_HAS_TRITON = importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op")


def triton_available() -> bool:
    """Whether the fused kernel can run (Triton importable and torch >= 2.6)."""
    return _HAS_TRITON


if _HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _apportion_kernel(
        scores_ptr, counts_ptr, index_ptr,
        rows_in, num_kv, num_heads, min_queries,
        REDUCE_ROWS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0)
        g = tl.arange(0, BLOCK_G)
        valid = g < num_kv
        if REDUCE_ROWS:
            s = tl.zeros((BLOCK_G,), dtype=tl.float32)
            for r in range(rows_in):
                s += tl.load(scores_ptr + r * num_kv + g, mask=valid, other=0.0).to(tl.float32)
        else:
            s = tl.load(scores_ptr + row * num_kv + g, mask=valid, other=0.0).to(tl.float32)
        # Sanitise: +inf entries share equally, NaN and negatives count as zero.
        pos_inf = s == float("inf")
        any_inf = tl.max(pos_inf.to(tl.int32), 0) > 0
        s = tl.where(any_inf, pos_inf.to(tl.float32), s)
        s = tl.where(s == s, s, 0.0)
        s = tl.where(valid, tl.maximum(s, 0.0), 0.0)
        peak = tl.max(s, 0)
        s = tl.where(peak > 0, s / tl.maximum(peak, 1.1754943508222875e-38),
                     tl.where(valid, 1.0, 0.0))
        spare = num_heads - num_kv * min_queries
        share = s / tl.sum(s, 0) * spare
        whole = tl.floor(share)
        frac = tl.where(valid, share - whole, -1.0)
        left = spare - tl.sum(whole, 0)
        # Largest remainder: rank each fraction, ties to the lower index.
        ahead = (frac[None, :] > frac[:, None]) | (
            (frac[None, :] == frac[:, None]) & (g[None, :] < g[:, None])
        )
        rank = tl.sum(ahead.to(tl.int32), 1)
        counts = whole.to(tl.int32) + (rank.to(tl.float32) < left).to(tl.int32) + min_queries
        counts = tl.where(valid, counts, 0)
        tl.store(counts_ptr + row * num_kv + g, counts.to(tl.int64), mask=valid)
        ends = tl.cumsum(counts, 0)
        h = tl.arange(0, BLOCK_H)
        past = (h[:, None] >= ends[None, :]) & valid[None, :]
        kv = tl.sum(past.to(tl.int32), 1)
        tl.store(index_ptr + row * num_heads + h, kv.to(tl.int64), mask=h < num_heads)

    @triton_op("kdgqa::apportion", mutates_args=())
    def _apportion_op(
        scores: Tensor, num_heads: int, min_queries: int, reduce_rows: bool
    ) -> tuple[Tensor, Tensor]:
        rows_in, num_kv = scores.shape
        rows_out = 1 if reduce_rows else rows_in
        counts = scores.new_empty((rows_out, num_kv), dtype=torch.int64)
        index = scores.new_empty((rows_out, num_heads), dtype=torch.int64)
        wrap_triton(_apportion_kernel)[(rows_out,)](
            scores, counts, index, rows_in, num_kv, num_heads, min_queries,
            REDUCE_ROWS=reduce_rows,
            BLOCK_G=max(triton.next_power_of_2(num_kv), 2),
            BLOCK_H=max(triton.next_power_of_2(num_heads), 2),
        )
        return counts, index


def apportion_triton(
    scores: Tensor, num_heads: int, min_queries: int = 1, reduce_rows: bool = False
) -> tuple[Tensor, Tensor]:
    """Fused ``proportional_counts`` + ``counts_to_kv_index`` on rows of ``scores`` ``(R, G)``.

    With ``reduce_rows`` the rows are summed first (the paper's batch-summed norms) and one
    row comes back. Returns ``(counts (R', G) int64, kv_index (R', H) int64)``.
    """
    if not _HAS_TRITON:
        raise RuntimeError("the fused allocation kernel needs triton and torch >= 2.6")
    return _apportion_op(scores.contiguous(), num_heads, min_queries, reduce_rows)
