"""timm's attention-pooling head (``AttentionPoolLatent``, ``global_pool='map'``) with G K/V
heads, for ``convert(..., attention_pool="gqa")``.

The head is one cross-attention from a learned latent query to the image tokens, run once per
image: it has no KV cache, so grouping it saves projection weights and FLOPs, not cache
memory, and by default it stays multi-head (``attention_pool="keep"``). Converting it makes a
model grouped end to end, as models trained with GQA everywhere are. Its K/V heads start as
the means of contiguous groups (query head h reads KV head h // (H / G)), so at G = H it is
the original head exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdgqa.errors import ConversionError

__all__ = ["ATTENTION_POOL_CHOICES", "GroupedAttentionPoolLatent", "attention_pools",
           "expanded_kv_state", "grouped_attention_pools"]

#: ``keep``: the head stays multi-head (the default); ``gqa``: uniform groups of its heads.
ATTENTION_POOL_CHOICES = ("keep", "gqa")


def _pool_class() -> type | None:
    try:
        from timm.layers import AttentionPoolLatent
    except ImportError:
        return None
    return AttentionPoolLatent


class GroupedAttentionPoolLatent(nn.Module):
    """An ``AttentionPoolLatent`` whose keys and values have ``num_kv_heads`` heads."""

    def __init__(self, pool: Any, num_kv_heads: int) -> None:
        super().__init__()
        heads, dim = int(pool.num_heads), int(pool.head_dim)
        if num_kv_heads < 1 or heads % num_kv_heads:
            raise ConversionError(f"the attention-pooling head has {heads} heads; "
                                  f"{num_kv_heads} KV heads must divide them")
        self.num_heads, self.num_kv_heads, self.head_dim = heads, num_kv_heads, dim
        self.latent_len, self.pool = int(pool.latent_len), pool.pool
        self.latent = nn.Parameter(pool.latent.detach().clone())
        self.pos_embed = (None if pool.pos_embed is None
                          else nn.Parameter(pool.pos_embed.detach().clone()))
        self.q: nn.Module = copy.deepcopy(pool.q)
        self.q_norm: nn.Module = copy.deepcopy(pool.q_norm)
        self.k_norm: nn.Module = copy.deepcopy(pool.k_norm)
        self.proj: nn.Module = copy.deepcopy(pool.proj)
        self.proj_drop: nn.Module = copy.deepcopy(pool.proj_drop)
        self.norm: nn.Module = copy.deepcopy(pool.norm)
        self.mlp: nn.Module | None = copy.deepcopy(pool.mlp)
        kv: nn.Linear = pool.kv
        self.kv = nn.Linear(kv.in_features, 2 * num_kv_heads * dim, bias=kv.bias is not None,
                            device=kv.weight.device, dtype=kv.weight.dtype)
        with torch.no_grad():
            self.kv.weight.copy_(self._pooled(kv.weight))
            if kv.bias is not None:
                self.kv.bias.copy_(self._pooled(kv.bias))

    def _pooled(self, t: Tensor) -> Tensor:
        """K rows then V rows of ``H`` heads -> of ``G`` heads, each the mean of its group."""
        heads, groups, dim = self.num_heads, self.num_kv_heads, self.head_dim
        parts = t.detach().reshape(2, groups, heads // groups, dim, *t.shape[1:]).mean(2)
        return parts.reshape(2 * groups * dim, *t.shape[1:])

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        batch, tokens, _ = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        q = self.q(self.latent.expand(batch, -1, -1))
        q = q.reshape(batch, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (self.kv(x).reshape(batch, tokens, 2, self.num_kv_heads, self.head_dim)
                .permute(2, 0, 3, 1, 4).unbind(0))
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        out = out.transpose(1, 2).reshape(batch, self.latent_len, -1)
        out = self.proj_drop(self.proj(out))
        if self.mlp is not None:
            out = out + self.mlp(self.norm(out))
        if self.pool == "token":
            return out[:, 0]
        if self.pool == "avg":
            return out.mean(1)
        return out


def attention_pools(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every timm ``AttentionPoolLatent`` in ``model``."""
    cls = _pool_class()
    if cls is None:
        return []
    return [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Module)
            and isinstance(m, cls)]


def grouped_attention_pools(model: nn.Module, num_kv_heads: int
                            ) -> list[tuple[str, GroupedAttentionPoolLatent]]:
    """The grouped replacements of ``model``'s attention-pooling heads (not yet installed);
    :class:`ConversionError` when there is none or G does not divide its heads."""
    pools = attention_pools(model)
    if not pools:
        raise ConversionError("attention_pool='gqa' but the model has no timm "
                              "AttentionPoolLatent head (transformers' attention-pooling "
                              "heads stay multi-head); use attention_pool='keep'")
    out = []
    for path, pool in pools:
        try:
            out.append((path, GroupedAttentionPoolLatent(pool, num_kv_heads)))
        except ConversionError as error:
            raise ConversionError(f"cannot convert {path!r}: {error}") from None
    return out


def expanded_kv_state(module: GroupedAttentionPoolLatent, prefix: str) -> dict[str, Tensor]:
    """``module``'s ``kv`` tensors with each KV head repeated for its query heads: what the
    multi-head ``AttentionPoolLatent`` of an MHA export holds."""
    heads, groups, dim = module.num_heads, module.num_kv_heads, module.head_dim
    out = {}
    for name, t in module.kv.named_parameters():
        parts = t.detach().reshape(2, groups, 1, dim, *t.shape[1:])
        repeated = parts.expand(2, groups, heads // groups, dim, *t.shape[1:])
        out[f"{prefix}kv.{name}"] = repeated.reshape(2 * heads * dim, *t.shape[1:]).clone()
    return out
