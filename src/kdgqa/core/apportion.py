"""From per-KV-head scores to a query-head -> KV-head map.

Two families live here:

* the *sound* apportionment used by default: largest-remainder rounding with a floor of
  ``min_queries`` per KV head, computed with tensor ops only, so it never synchronises with
  the host, traces under ``torch.compile(fullgraph=True)`` and is defined for every input
  (zero, equal, NaN or infinite scores included);
* transcriptions of the official code's arithmetic (min-max scaling, rounding, repair loops),
  kept for fidelity. They run on the host and raise where the official code breaks.

Query heads are always cut into contiguous runs: head ``h`` serves the KV head whose run
contains ``h``, as ``torch.split(q, counts, dim=heads)`` does in the paper's code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdgqa.core.kernels import apportion_triton, triton_available
from kdgqa.errors import SchemeError

__all__ = [
    "apportion",
    "counts_to_kv_index",
    "even_counts",
    "key_norms",
    "proportional_counts",
    "reference_dgqa_counts",
    "reference_kdgqa_counts",
]


def even_counts(num_heads: int, num_kv_heads: int) -> list[int]:
    """Group sizes as even as possible; the first ``num_heads % num_kv_heads`` get one more."""
    base, extra = divmod(num_heads, num_kv_heads)
    return [base + (1 if g < extra else 0) for g in range(num_kv_heads)]


def counts_to_kv_index(counts: Tensor, num_heads: int) -> Tensor:
    """Map contiguous run sizes ``(..., G)`` to a KV-head index per query head ``(..., H)``.

    Works on any leading batch shape and without a host round trip: head ``h`` belongs to the
    number of runs that end at or before it.
    """
    ends = counts.cumsum(-1)
    heads = torch.arange(num_heads, device=counts.device)
    return (heads.unsqueeze(-1) >= ends.unsqueeze(-2)).sum(-1)


def key_norms(k: Tensor, per_sample: bool = False) -> Tensor:
    """Frobenius norm of each key head over (tokens x head_dim), accumulated in fp32 (fp64
    for fp64 keys).

    ``k`` is ``(B, G, N, D)``. Returns ``(G,)`` summed over the batch, as the paper does, or
    ``(B, G)`` when ``per_sample``. Computing in fp32 keeps bf16/fp16 keys from overflowing
    or losing the small differences the allocation depends on.
    """
    dtype = torch.promote_types(k.dtype, torch.float32)
    norms = torch.linalg.vector_norm(k.detach(), dim=(2, 3), dtype=dtype)
    return norms if per_sample else norms.sum(0)


def proportional_counts(scores: Tensor, num_heads: int, min_queries: int = 1) -> Tensor:
    """Apportion ``num_heads`` query heads to KV heads in proportion to ``scores``.

    Every KV head first gets ``min_queries``; the remaining heads are shared by largest
    remainder (Hamilton's method), ties going to the lower index. Scores are sanitised so the
    result is always valid: NaN and negatives count as zero, ``+inf`` entries share equally,
    and all-zero scores split evenly. Batched over leading dimensions; no host sync.
    """
    num_kv_heads = scores.shape[-1]
    spare = num_heads - num_kv_heads * min_queries
    if spare < 0:
        raise SchemeError(
            f"min_queries={min_queries} x num_kv_heads={num_kv_heads} exceeds "
            f"num_heads={num_heads}; expected min_queries <= {num_heads // num_kv_heads}"
        )
    s = scores.detach().float()
    is_pos_inf = torch.isposinf(s)
    s = torch.where(is_pos_inf.any(-1, keepdim=True), is_pos_inf.float(), s)
    s = torch.nan_to_num(s, nan=0.0, neginf=0.0).clamp_min(0.0)
    # Normalising by the max first keeps the sum finite even for scores near float max.
    peak = s.amax(-1, keepdim=True)
    s = torch.where(peak > 0, s / peak.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    share = s / s.sum(-1, keepdim=True) * spare
    whole = share.floor()
    left = (spare - whole.sum(-1, keepdim=True)).clamp(0, num_kv_heads)
    order = torch.argsort(share - whole, dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1)
    counts = whole + (rank < left).float() + min_queries
    return counts.long()


def apportion(
    scores: Tensor, num_heads: int, min_queries: int = 1, reduce_rows: bool = False
) -> tuple[Tensor, Tensor]:
    """``proportional_counts`` and the head map for rows of ``scores`` ``(R, G)``.

    With ``reduce_rows`` the rows are summed first and one row comes back. On CUDA with Triton
    this is one fused kernel launch (``kdgqa.core.kernels``); elsewhere, the same arithmetic in
    tensor ops. Returns ``(counts (R', G), kv_index (R', H))``, both int64.
    """
    if scores.is_cuda and triton_available():
        return apportion_triton(scores, num_heads, min_queries, reduce_rows)
    if reduce_rows:
        scores = scores.float().sum(0, keepdim=True)
    counts = proportional_counts(scores, num_heads, min_queries)
    return counts, counts_to_kv_index(counts, num_heads)


def _check_reference_input(values: Tensor, what: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise SchemeError(
            f"reference allocation is undefined: {what} {values.tolist()} are not all finite "
            "(the official code turns the NaN into INT_MIN and its repair loop runs ~2^31 times)"
        )


def reference_kdgqa_counts(norms: Tensor, num_heads: int) -> list[int]:
    """The official KDGQA allocation: min-max scale, ``round(n / sum(n) * H)``, then repair.

    Repair decrements the (first) largest count while the sum exceeds ``H`` and increments the
    (first) smallest while below. The smallest-norm head gets zero queries in most batches;
    that is the official behaviour, reproduced on purpose. Raises ``SchemeError`` when all norms
    are equal (G = 1 included): min-max scaling then divides 0 by 0.
    """
    _check_reference_input(norms, "key norms")
    low, high = norms.min(), norms.max()
    if bool(high == low):
        raise SchemeError(
            f"reference KDGQA allocation is undefined for equal key norms {norms.tolist()} "
            "(min-max scaling divides 0 by 0; G = 1 always hits this); use reference=False"
        )
    scaled = (norms - low) / (high - low)
    counts: list[int] = (scaled / scaled.sum() * num_heads).round().int().tolist()
    while sum(counts) > num_heads:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < num_heads:
        counts[counts.index(min(counts))] += 1
    return counts


def reference_dgqa_counts(scores: Tensor, num_heads: int) -> list[int]:
    """The official DGQA allocation: ``round(x / sum(x) * H)`` repaired by random +-1 steps.

    The random steps draw from torch's global CPU generator, as the official code does, so a
    seeded run reproduces it. Raises ``SchemeError`` when the scores sum to zero or are not
    finite, where the official code would divide 0 by 0 and never finish repairing.
    """
    _check_reference_input(scores, "DGQA scores")
    if bool(scores.sum() == 0):
        raise SchemeError(
            f"reference DGQA allocation is undefined for scores {scores.tolist()} summing to 0; "
            "use reference=False"
        )
    counts: list[int] = (scores / scores.sum(dim=0) * num_heads).round().int().tolist()
    size = len(counts)
    while sum(counts) > num_heads:
        idx = int(torch.randint(0, size, (1,)).item())
        if counts[idx] > 0:
            counts[idx] -= 1
    while sum(counts) < num_heads:
        idx = int(torch.randint(0, size, (1,)).item())
        counts[idx] += 1
    return counts
