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

__all__ = ["expand_kv", "grouped_attention", "native_gqa_is_fused"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def native_gqa_is_fused(q: Tensor, attn_mask: Tensor | None) -> bool:
    """Whether SDPA's ``enable_gqa`` path runs a fused kernel for these inputs.

    In torch 2.5-2.14 ``enable_gqa`` is served by the flash (and cuDNN) kernels, which need
    CUDA tensors in fp16/bf16 and no arbitrary mask; otherwise SDPA falls back to its math
    path, which is slower than expanding K/V and using the memory-efficient kernel.
    """
    return q.is_cuda and q.dtype in _HALF_DTYPES and attn_mask is None


def expand_kv(kv: Tensor, kv_index: Tensor) -> Tensor:
    """Give every query head its own copy of its KV head: ``(B, G, N, D) -> (B, H, N, D)``.

    ``kv_index`` is ``(H,)`` (shared by the batch) or ``(B, H)`` (one map per input).
    """
    if kv_index.dim() == 1:
        return kv.index_select(1, kv_index)
    batch, _, tokens, dim = kv.shape
    index = kv_index[:, :, None, None].expand(batch, kv_index.shape[1], tokens, dim)
    return kv.gather(1, index)


def grouped_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_index: Tensor,
    *,
    uniform: bool,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> Tensor:
    """Attention where query head ``h`` reads KV head ``kv_index[h]``.

    ``q`` is ``(B, H, N, D)``, ``k`` and ``v`` are ``(B, G, N, D)``. ``uniform`` promises that
    ``kv_index`` is ``arange(H) // (H // G)``, which SDPA's native GQA layout assumes.
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads == num_heads and uniform:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
        )
    if uniform and native_gqa_is_fused(q, attn_mask):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            enable_gqa=True,
        )
    return F.scaled_dot_product_attention(
        q, expand_kv(k, kv_index), expand_kv(v, kv_index),
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
    )
