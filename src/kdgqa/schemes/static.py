"""Schemes whose map never changes: MHA, MQA, uniform GQA and PGQA (GQA plus output noise)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from kdgqa.core.perturb import perturb_rows
from kdgqa.errors import SchemeError
from kdgqa.schemes.base import QueryAllocator, check_divisible
from kdgqa.schemes.registry import register_scheme

__all__ = ["GQAAllocator", "MHAAllocator", "MQAAllocator", "PGQAAllocator"]


@register_scheme
class MHAAllocator(QueryAllocator):
    """Multi-head attention: one KV head per query head."""

    name = "mha"

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        if num_kv_heads != num_heads:
            raise SchemeError(
                f"scheme 'mha' needs num_kv_heads == num_heads ({num_heads}), "
                f"got num_kv_heads={num_kv_heads}"
            )
        super().__init__(num_heads, num_kv_heads, **options)


@register_scheme
class MQAAllocator(QueryAllocator):
    """Multi-query attention: every query head shares the single KV head."""

    name = "mqa"

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        if num_kv_heads != 1:
            raise SchemeError(f"scheme 'mqa' needs num_kv_heads == 1, got {num_kv_heads}")
        super().__init__(num_heads, num_kv_heads, **options)


@register_scheme
class GQAAllocator(QueryAllocator):
    """Uniform grouped-query attention: H // G contiguous query heads per KV head."""

    name = "gqa"

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        check_divisible(self.name, num_heads, num_kv_heads)
        super().__init__(num_heads, num_kv_heads, **options)


@register_scheme
class PGQAAllocator(GQAAllocator):
    """Perturbed GQA (the paper's case study): static groups, noise subtracted from outputs.

    For each query head's output, flattened over (tokens x head_dim), a ``torch.rand`` row is
    drawn, the entry at the head's position within its group is zeroed (the official code
    zeroes the diagonal of each group's noise matrix), the row is standardised, rescaled to the
    output row's mean and std, and subtracted. Sound mode adds noise only in training, so
    evaluation is deterministic; ``reference=True`` adds it in evaluation too, as published.
    """

    name = "pgqa"
    option_defaults = MappingProxyType({"reference": False})
    off_diagonal: Tensor

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        super().__init__(num_heads, num_kv_heads, **options)
        group = num_heads // num_kv_heads
        position = torch.arange(num_heads) % group
        off_diagonal = (torch.arange(group)[None, :] != position[:, None]).float()
        self.register_buffer("off_diagonal", off_diagonal, persistent=False)
        #: How the perturbation runs (``kdgqa.core.perturb.PERTURB_METHODS``); all compute the
        #: same values and gradients. Kept for benchmarking and tests.
        self.perturb_method = "auto"

    def perturb(self, out: Tensor, kv_index: Tensor) -> Tensor:
        if not (self.training or self.options["reference"]):
            return out
        _, heads, tokens, dim = out.shape
        noise = torch.rand(heads, tokens * dim, device=out.device)
        width = min(self.off_diagonal.shape[1], tokens * dim)
        noise[:, :width].mul_(self.off_diagonal[:, :width])
        noise_std, noise_mean = torch.std_mean(noise, dim=-1, keepdim=True)
        unit = (noise - noise_mean) / noise_std.clamp_min(torch.finfo(noise.dtype).tiny)
        # One fused op with a closed-form backward (kdgqa.core.perturb); any layout of ``out``.
        return perturb_rows(out, unit, self.perturb_method)

    def fixed_kv_index(self) -> Tensor | None:
        return None if self.options["reference"] else self.static_kv_index

    def dynamic_reason(self) -> str:
        return "reference PGQA adds noise at evaluation time"
