"""One fused attention call for any query-head -> KV-head map.

Uniform contiguous groups go through ``scaled_dot_product_attention(..., enable_gqa=True)``
where that stays on a fused kernel (CUDA flash/cuDNN, half precision, no explicit mask);
everywhere else K and V are first expanded to one head per query head with a single gather
by ``kv_index`` and handed to SDPA as plain multi-head attention. Neither path loops over
groups or asks the host what the allocation is, so no GPU->CPU synchronisation happens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdgqa.kernels import expand_heads_triton

__all__ = ["expand_kv", "grouped_attention", "native_gqa_is_fused"]

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
    """
    batch, tokens, double_kv, dim = kv.shape
    heads = kv_index.shape[-1]
    if method == "auto":
        method = "gather"
    if method == "triton":
        rows = kv_index if kv_index.dim() == 2 else kv_index[None]
        return expand_heads_triton(kv, torch.cat((rows, rows + double_kv // 2), dim=1))
    pairs = kv.unflatten(2, (2, double_kv // 2))
    if method == "gather":
        rows = kv_index if kv_index.dim() == 2 else kv_index[None]
        index = rows[:, None, None, :, None].expand(batch, tokens, 2, heads, dim)
        return pairs.gather(3, index).flatten(2, 3)
    if kv_index.dim() == 2:
        raise ValueError(f"expand method {method!r} supports only a (H,) map; use 'gather'")
    if method == "index_select":
        return pairs.index_select(3, kv_index).flatten(2, 3)
    if method == "advanced_index":
        return pairs[:, :, :, kv_index].flatten(2, 3)
    raise ValueError(
        f"unknown expand method {method!r}; valid: auto, triton, index_select, advanced_index, "
        "gather"
    )


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
) -> Tensor:
    """Attention where query head ``h`` reads KV head ``kv_index[h]``.

    ``q`` is ``(B, H, N, D)``; ``kv`` is K heads then V heads, token-major ``(B, N, 2G, D)``.
    ``uniform`` promises that ``kv_index`` is ``arange(H) // (H // G)``, the layout SDPA's
    native GQA assumes; without it the map is read from ``kv_index`` on the device.
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
    k, v = expand_kv(kv, kv_index, expand_method).transpose(1, 2).chunk(2, dim=1)
    return sdpa(k, v)
