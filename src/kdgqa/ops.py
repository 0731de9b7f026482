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
    """Give every query head its own K and V: ``(B, 2, G, N, D) -> (B, 2, H, N, D)``.

    K and V are stacked on dim 1 so both are served by one gather (one kernel forward, one
    in backward). ``kv_index`` is ``(H,)`` (shared by the batch) or ``(B, H)`` (per input).
    """
    if kv_index.dim() == 1:
        return kv.index_select(2, kv_index)
    batch, pair, _, tokens, dim = kv.shape
    index = kv_index[:, None, :, None, None].expand(batch, pair, kv_index.shape[1], tokens, dim)
    return kv.gather(2, index)


def grouped_attention(
    q: Tensor,
    kv: Tensor,
    kv_index: Tensor,
    *,
    uniform: bool,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> Tensor:
    """Attention where query head ``h`` reads KV head ``kv_index[h]``.

    ``q`` is ``(B, H, N, D)`` and ``kv`` is K and V stacked, ``(B, 2, G, N, D)``. ``uniform``
    promises that ``kv_index`` is ``arange(H) // (H // G)``, the layout SDPA's native GQA
    assumes; without it the map is read from ``kv_index`` on the device.
    """
    num_heads, num_kv_heads = q.shape[1], kv.shape[2]
    sdpa = F.scaled_dot_product_attention
    if uniform and num_kv_heads == num_heads:
        return sdpa(q, kv[:, 0], kv[:, 1], attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal)
    if uniform and native_gqa_is_fused(q, attn_mask):
        return sdpa(q, kv[:, 0], kv[:, 1], attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, enable_gqa=True)
    expanded = expand_kv(kv, kv_index)
    return sdpa(q, expanded[:, 0], expanded[:, 1], attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal)
