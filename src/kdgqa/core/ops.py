"""One fused attention call for any query-head -> KV-head map.

Uniform contiguous groups go through ``scaled_dot_product_attention(..., enable_gqa=True)``
where that stays on a fused kernel (CUDA flash/cuDNN, half precision, no explicit mask).
An uneven or per-sample map on CUDA in half precision, without mask, dropout or causality
and with head dim <= 128, runs :func:`kdgqa.core.headmap_attention.headmap_attention`: one
fused kernel that reads each query head's KV head from the map, with no expansion and an
atomic-free, bitwise-reproducible backward. Everywhere else (CPU, fp32, masks, dropout) K
and V are first expanded to one head per query head with a single gather by ``kv_index``
and handed to SDPA as plain multi-head attention. No path loops over groups or asks the
host what the allocation is, so no GPU->CPU synchronisation happens.

A *static* uneven allocation (contiguous groups whose sizes the host already knows, e.g.
``calibrated``) has a third path, taken where the head-map kernel does not serve (dropout,
masks) or on request (``expand_method="split"``): one native-GQA call per distinct group
size, each on the slice of query heads and KV heads whose groups have that size. The number
of calls is fixed by the model, not by the data, so it needs no sync and traces under
``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdgqa.core.headmap_attention import headmap_attention
from kdgqa.core.kernels import expand_heads_triton
from kdgqa.errors import KdgqaError

__all__ = ["expand_kv", "grouped_attention", "native_gqa_is_fused", "split_by_group_size"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def native_gqa_is_fused(q: Tensor, attn_mask: Tensor | None) -> bool:
    """Whether SDPA's ``enable_gqa`` path runs a fused kernel for these inputs.

    In torch 2.5-2.14 ``enable_gqa`` is served by the flash (and cuDNN) kernels, which need
    CUDA tensors in fp16/bf16 and no arbitrary mask; otherwise SDPA falls back to its math
    path, which is slower than expanding K/V and using the memory-efficient kernel.
    """
    return q.is_cuda and q.dtype in _HALF_DTYPES and attn_mask is None


def expand_kv(kv: Tensor, kv_index: Tensor, method: str = "auto") -> Tensor:
    """Give every query head its own K and V: ``(B, N, 2G, D) -> (B, N, 2H, D)``.

    ``kv`` is token-major, as the fused projection produces it (K heads then V heads), so each
    gathered unit is one contiguous head vector and both K and V are served by one kernel
    forward and one backward. ``kv_index`` is ``(H,)`` (shared by the batch) or ``(B, H)``
    (one map per input). ``method="auto"`` is ``gather``: on the H200 it was the fastest with
    ``triton`` (our fused kernel) at ViT shapes, and ``torch.compile`` fuses it natively
    (``benchmarks/kv_expand.py``); ``index_select`` and ``advanced_index`` were slower.

    A gather's backward adds the gradients of a KV head's query heads with atomic adds on
    CUDA, in an order that varies between runs. ``onehot`` expands by a matmul with the
    one-hot map instead (exact: one term per output is non-zero), whose backward is a
    reduction cuBLAS runs in a fixed order; ``auto`` picks it when the user asked for
    reproducibility with ``torch.use_deterministic_algorithms(True)``.
    """
    batch, tokens, double_kv, dim = kv.shape
    heads = kv_index.shape[-1]
    if method == "auto":
        method = "onehot" if torch.are_deterministic_algorithms_enabled() else "gather"
    if method == "triton":
        rows = kv_index if kv_index.dim() == 2 else kv_index[None]
        return expand_heads_triton(kv, torch.cat((rows, rows + double_kv // 2), dim=1))
    pairs = kv.unflatten(2, (2, double_kv // 2))
    if method == "onehot":
        onehot = F.one_hot(kv_index, double_kv // 2).to(kv.dtype)  # ([B,] H, G)
        spec = "hg" if kv_index.dim() == 1 else "bhg"
        return torch.einsum(f"{spec},bntgd->bnthd", onehot, pairs).flatten(2, 3)
    if method == "gather":
        rows = kv_index if kv_index.dim() == 2 else kv_index[None]
        index = rows[:, None, None, :, None].expand(batch, tokens, 2, heads, dim)
        return pairs.gather(3, index).flatten(2, 3)
    if kv_index.dim() == 2:
        raise KdgqaError(f"expand method {method!r} supports only a (H,) map; use 'gather'")
    if method == "index_select":
        return pairs.index_select(3, kv_index).flatten(2, 3)
    if method == "advanced_index":
        return pairs[:, :, :, kv_index].flatten(2, 3)
    raise KdgqaError(
        f"unknown expand method {method!r}; valid: auto, triton, index_select, advanced_index, "
        "gather, onehot"
    )


def split_by_group_size(counts: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Runs of consecutive equal-size groups: ``(first_query, end_query, first_kv, end_kv)``.

    Groups are contiguous: KV head ``g`` serves the ``counts[g]`` query heads after those of
    ``g - 1``. Neighbouring groups of one size share a call, so groups sorted by size give
    one run per distinct size.
    """
    runs: list[tuple[int, int, int, int]] = []
    query = 0
    for g, count in enumerate(counts):
        if runs and counts[g - 1] == count:
            q0, _, k0, _ = runs[-1]
            runs[-1] = (q0, query + count, k0, g + 1)
        else:
            runs.append((query, query + count, g, g + 1))
        query += count
    return runs


def grouped_attention(
    q: Tensor,
    kv: Tensor,
    kv_index: Tensor,
    *,
    uniform: bool,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    expand_method: str = "auto",
    static_counts: tuple[int, ...] | None = None,
) -> Tensor:
    """Attention where query head ``h`` reads KV head ``kv_index[h]``.

    ``q`` is ``(B, H, N, D)``; ``kv`` is K heads then V heads, token-major ``(B, N, 2G, D)``.
    ``uniform`` promises that ``kv_index`` is ``arange(H) // (H // G)``, the layout SDPA's
    native GQA assumes; without it the map is read from ``kv_index`` on the device.
    ``static_counts`` promises that ``kv_index`` is the contiguous map of these group sizes
    and never changes: where native GQA is fused (or ``expand_method="split"``), attention
    then runs as one native-GQA call per run of equal group sizes instead of expanding K/V.
    ``"auto"`` picks the head-map kernel where it serves (see the module docstring);
    ``"headmap"`` asks for it also in fp32 and for any head dim (CUDA, no mask, no dropout,
    not causal), ``"gather"`` and the other :func:`expand_kv` methods for the expansion.
    Returns ``(B, H, N, D)``.
    """
    num_heads, num_kv_heads = q.shape[1], kv.shape[2] // 2

    def sdpa(k: Tensor, v: Tensor, enable_gqa: bool = False) -> Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            enable_gqa=enable_gqa,
        )

    if uniform and (num_kv_heads == num_heads or native_gqa_is_fused(q, attn_mask)):
        k, v = kv.transpose(1, 2).chunk(2, dim=1)
        return sdpa(k, v, enable_gqa=num_kv_heads != num_heads)
    plain = q.is_cuda and attn_mask is None and dropout_p == 0.0 and not is_causal
    if (expand_method == "headmap" and plain) or (
        expand_method == "auto" and plain and q.dtype in _HALF_DTYPES and q.shape[-1] <= 128
    ):
        k, v = kv.transpose(1, 2).chunk(2, dim=1)
        # The allocators build maps in range; the kernels clamp regardless (memory-safe).
        return headmap_attention(q, k, v, kv_index, check_map=False)
    if static_counts is not None and (
        expand_method == "split" or (expand_method == "auto" and native_gqa_is_fused(q, attn_mask))
    ):
        return _split_attention(q, kv, static_counts, attn_mask, dropout_p, is_causal)
    if expand_method in ("headmap", "split"):  # not applicable here: expand as usual
        expand_method = "auto"
    k, v = expand_kv(kv, kv_index, expand_method).transpose(1, 2).chunk(2, dim=1)
    return sdpa(k, v)


def _split_attention(
    q: Tensor,
    kv: Tensor,
    counts: tuple[int, ...],
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
) -> Tensor:
    """One SDPA call per run of equal group sizes (see :func:`split_by_group_size`)."""
    num_heads, num_kv_heads = q.shape[1], kv.shape[2] // 2
    if len(counts) != num_kv_heads or sum(counts) != num_heads:
        raise KdgqaError(f"static_counts {counts} do not split {num_heads} query heads over "
                         f"{num_kv_heads} KV heads")
    per_head_mask = attn_mask is not None and attn_mask.dim() >= 3 and (
        attn_mask.shape[-3] == num_heads and num_heads > 1
    )
    outs = []
    for q0, q1, g0, g1 in split_by_group_size(counts):
        k = kv[:, :, g0:g1].transpose(1, 2)
        v = kv[:, :, num_kv_heads + g0:num_kv_heads + g1].transpose(1, 2)
        mask = attn_mask[..., q0:q1, :, :] if per_head_mask and attn_mask is not None else attn_mask
        out = F.scaled_dot_product_attention(
            q[:, q0:q1], k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
            enable_gqa=q1 - q0 != g1 - g0,
        )
        outs.append(out.transpose(1, 2))
    # Concatenate token-major so the caller's (B, N, H * D) reshape is a view, not a copy.
    return torch.cat(outs, dim=2).transpose(1, 2)
