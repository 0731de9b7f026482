"""Pooling the K/V projections of a group of heads into one KV head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdgqa.conversion.options import POOLING_METHODS
from kdgqa.core.apportion import even_counts
from kdgqa.errors import ConversionError

__all__ = ["check_pooling", "pool_heads"]


def check_pooling(pooling: object) -> None:
    """Raise :class:`ConversionError` unless ``pooling`` names a pooling method."""
    if pooling not in POOLING_METHODS:
        raise ConversionError(
            f"unknown pooling {pooling!r}; valid pooling methods: {', '.join(POOLING_METHODS)}"
        )


def pool_heads(
    weight: Tensor,
    num_heads: int,
    num_kv_heads: int,
    pooling: str = "mean",
    groups: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """Pool ``num_heads`` row blocks of ``weight`` into ``num_kv_heads`` groups.

    ``weight`` is ``(num_heads * head_dim, ...)`` (a weight or a bias). Groups are the
    contiguous runs of :func:`kdgqa.even_counts`, or ``groups`` (lists of head indices, any
    order, one per KV head). ``mean`` averages each group (GQA's recipe), ``first`` keeps
    its first head, ``random`` draws fresh values with the group's standard deviation (a
    bias starts at zero) from torch's generator, the "random init" ablation of GQA.
    """
    check_pooling(pooling)
    if pooling == "fit":
        raise ConversionError("pooling 'fit' solves K and V together from calibration moments "
                              "(kdgqa.conversion.fit.fitted_kv), not one tensor at a time")
    heads = weight.reshape(num_heads, -1, *weight.shape[1:])
    if groups is None:
        parts: Sequence[Tensor] = torch.split(heads, even_counts(num_heads, num_kv_heads), 0)
    else:
        parts = [heads[list(group)] for group in groups]
    pooled: list[Tensor] = []
    for group in parts:
        if pooling == "mean":
            pooled.append(group.float().mean(0).to(weight.dtype))
        elif pooling == "first":
            pooled.append(group[0].clone())
        elif weight.dim() == 1:
            pooled.append(torch.zeros_like(group[0]))
        else:
            std = group.float().std()
            pooled.append((torch.randn(group[0].shape) * std).to(weight.dtype))
    return torch.cat(pooled, dim=0).to(weight.device)
