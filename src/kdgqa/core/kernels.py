"""One Triton launch for the whole key-driven allocation on CUDA.

In eager mode the allocation written as tensor ops is ~25 tiny kernels per layer, and at ViT
shapes their launch overhead costs more than the attention itself. This kernel does the batch
reduction of the key norms, the largest-remainder apportionment and the head map in a single
program per row. It is registered as a ``torch.library`` Triton op, so ``torch.compile``
traces it like any other op. Where Triton or CUDA is missing, callers use the tensor-op
version in ``kdgqa.core.apportion`` instead, which computes the same thing.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

__all__ = ["apportion_triton", "expand_heads_triton", "triton_available"]

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

    @triton.jit
    def _expand_fwd_kernel(
        src_ptr, index_ptr, out_ptr,
        rows, tokens, src_row_stride, index_batch_stride,
        OUT_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_OUT: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    ):
        j = tl.arange(0, BLOCK_OUT)
        d = tl.arange(0, BLOCK_D)
        mask = (j < OUT_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
        for i in range(ROWS_PER_PROGRAM):
            r = tl.program_id(0) * ROWS_PER_PROGRAM + i
            live = mask & (r < rows)
            src = tl.load(index_ptr + (r // tokens) * index_batch_stride + j,
                          mask=j < OUT_HEADS, other=0)
            vals = tl.load(src_ptr + r.to(tl.int64) * src_row_stride
                           + src[:, None] * HEAD_DIM + d[None, :], mask=live)
            tl.store(out_ptr + r.to(tl.int64) * (OUT_HEADS * HEAD_DIM)
                     + j[:, None] * HEAD_DIM + d[None, :], vals, mask=live)

    @triton.jit
    def _expand_bwd_kernel(
        grad_ptr, index_ptr, dsrc_ptr,
        rows, tokens, index_batch_stride,
        OUT_HEADS: tl.constexpr, IN_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_D: tl.constexpr,
        ROWS_PER_PROGRAM: tl.constexpr,
    ):
        # Per token: dsrc (IN, D) = one_hot(index)^T (IN, OUT) @ grad (OUT, D), on tensor
        # cores with an fp32 accumulator; the one-hot entries are exact in bf16/fp16.
        j = tl.arange(0, BLOCK_OUT)
        s = tl.arange(0, BLOCK_IN)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        for i in range(ROWS_PER_PROGRAM):
            r = tl.program_id(0) * ROWS_PER_PROGRAM + i
            live = r < rows
            src = tl.load(index_ptr + (r // tokens) * index_batch_stride + j,
                          mask=j < OUT_HEADS, other=-1)
            grad = tl.load(grad_ptr + r.to(tl.int64) * (OUT_HEADS * HEAD_DIM)
                           + j[:, None] * HEAD_DIM + d[None, :],
                           mask=(j < OUT_HEADS)[:, None] & dmask[None, :] & live, other=0.0)
            one_hot = (src[None, :] == s[:, None]).to(grad.dtype)
            total = tl.dot(one_hot, grad, out_dtype=tl.float32)
            tl.store(dsrc_ptr + r.to(tl.int64) * (IN_HEADS * HEAD_DIM)
                     + s[:, None] * HEAD_DIM + d[None, :],
                     total.to(dsrc_ptr.dtype.element_ty),
                     mask=(s < IN_HEADS)[:, None] & dmask[None, :] & live)

    _ROWS_PER_PROGRAM = 4

    @triton_op("kdgqa::expand_heads", mutates_args=())
    def _expand_heads_op(src: Tensor, index: Tensor) -> Tensor:
        batch, tokens, _, dim = src.shape
        out_heads = index.shape[1]
        out = src.new_empty((batch, tokens, out_heads, dim))
        rows = batch * tokens
        grid = (triton.cdiv(rows, _ROWS_PER_PROGRAM),)
        wrap_triton(_expand_fwd_kernel)[grid](
            src, index, out, rows, tokens, src.stride(1),
            index.stride(0) if index.shape[0] > 1 else 0,
            OUT_HEADS=out_heads, HEAD_DIM=dim,
            BLOCK_OUT=triton.next_power_of_2(out_heads), BLOCK_D=triton.next_power_of_2(dim),
            ROWS_PER_PROGRAM=_ROWS_PER_PROGRAM,
        )
        return out

    @triton_op("kdgqa::expand_heads_backward", mutates_args=())
    def _expand_heads_backward_op(grad: Tensor, index: Tensor, in_heads: int) -> Tensor:
        batch, tokens, out_heads, dim = grad.shape
        dsrc = grad.new_empty((batch, tokens, in_heads, dim))
        rows = batch * tokens
        grid = (triton.cdiv(rows, _ROWS_PER_PROGRAM),)
        wrap_triton(_expand_bwd_kernel)[grid](
            grad, index, dsrc, rows, tokens, index.stride(0) if index.shape[0] > 1 else 0,
            OUT_HEADS=out_heads, IN_HEADS=in_heads, HEAD_DIM=dim,
            BLOCK_OUT=max(triton.next_power_of_2(out_heads), 16),
            BLOCK_IN=max(triton.next_power_of_2(in_heads), 16),
            BLOCK_D=max(triton.next_power_of_2(dim), 16),
            ROWS_PER_PROGRAM=_ROWS_PER_PROGRAM,
        )
        return dsrc

    def _expand_setup_context(ctx, inputs, output):
        src, index = inputs
        ctx.save_for_backward(index)
        ctx.in_heads = src.shape[2]

    def _expand_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _expand_heads_backward_op(grad.contiguous(), index, ctx.in_heads), None

    _expand_heads_op.register_autograd(_expand_backward, setup_context=_expand_setup_context)

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


def expand_heads_triton(src: Tensor, index: Tensor) -> Tensor:
    """``out[b, n, j] = src[b, n, index[b or 0, j]]`` for token-major heads, with autograd.

    ``src`` is ``(B, N, S, D)`` with contiguous head vectors (a view into a fused projection
    is fine), ``index`` is ``(1 or B, J)`` int64. The backward sums each output head's
    gradient into its source head per token, in registers, without atomics.
    """
    if not _HAS_TRITON:
        raise RuntimeError("the fused expansion kernel needs triton and torch >= 2.6")
    _, tokens, _, dim = src.shape
    if src.stride(3) != 1 or src.stride(2) != dim or src.stride(0) != tokens * src.stride(1):
        src = src.contiguous()
    return _expand_heads_op(src, index.contiguous())
