"""Grouped-query attention for timm ``Attention`` with qk-norm (``qk_norm=True``).

timm normalises each head's query and key with one ``norm_layer(head_dim)`` applied to the
``(B, H, N, head_dim)`` tensor, so the norm's weights are shared by every head. A pooled KV
head therefore uses the very same K-norm the heads of its group used: with G = H this is the
original layer, and with G < H it is exactly the MHA layer whose K projections were replaced by
their group means (the norm acts after the projection, on the pooled key). Only norms over
``head_dim`` (shared across heads) can be kept that way; anything else is refused.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.core.ops import grouped_attention

__all__ = ["QKNormGroupedQueryAttention", "shared_head_norm"]


def shared_head_norm(norm: nn.Module, head_dim: int) -> bool:
    """Whether ``norm`` normalises over ``head_dim`` only (weights shared by all heads)."""
    shape = getattr(norm, "normalized_shape", None)
    if shape is None:
        return False
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return shape == (head_dim,)


class QKNormGroupedQueryAttention(GroupedQueryAttention):
    """:class:`GroupedQueryAttention` that normalises queries and (pooled) keys per head.

    ``q_norm``/``k_norm`` are copies of the original layer's norms, kept under the same
    names as in timm. Key-driven schemes see the normalised keys, the ones attention reads.
    """

    def __init__(self, *args: Any, q_norm: nn.Module, k_norm: nn.Module,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.q_norm = copy.deepcopy(q_norm)
        self.k_norm = copy.deepcopy(k_norm)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        batch, tokens, _ = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).view(batch, tokens, heads + 2 * kv_heads, head_dim)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
        q = self.q_norm(q.transpose(1, 2))
        k = self.k_norm(k)  # per head over head_dim: token-major layout is fine
        kv = torch.cat([k, v], dim=2)  # K heads then V heads, token-major
        kv_index = self.allocator(k.transpose(1, 2))
        out = grouped_attention(
            q, kv, kv_index,
            uniform=self.allocator.uniform,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            is_causal=is_causal,
            expand_method=self.expand_method,
            static_counts=self.allocator.host_counts,
        )
        out = self.allocator.perturb(out, kv_index)
        self.last_kv_index = kv_index.detach()
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        return self.proj_drop(self.proj(out))

