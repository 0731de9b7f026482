"""``GroupedQueryAttention``: a drop-in for timm's ViT ``Attention`` with pluggable allocation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kdgqa.core.ops import grouped_attention
from kdgqa.errors import SchemeError
from kdgqa.schemes import QueryAllocator, build_allocator

__all__ = ["GroupedQueryAttention", "start_epoch"]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SchemeError(f"{name} must be a positive integer, got {value!r}")


class GroupedQueryAttention(nn.Module):
    """Self-attention with ``num_heads`` query heads sharing ``num_kv_heads`` KV heads.

    How query heads map to KV heads is decided by the ``scheme`` (see
    ``kdgqa.available_schemes()``): fixed for ``mha``/``mqa``/``gqa``/``pgqa``, chosen from the
    keys for ``kdgqa``/``dgqa-ema``/``dgqa-diff`` (one map per input for ``kdgqa-ps``), measured
    once at conversion for ``calibrated``/``similarity``. Scheme options (``reference``,
    ``min_queries``, ``window_size``, ``beta``, ...) are passed by keyword.

    The forward signature matches timm's ``Attention`` (``attn_mask``, ``is_causal``), so the
    module can replace it inside a timm ``Block``. Q, K and V come from one fused projection of
    width ``(H + 2G) * head_dim``; attention is a single SDPA call whatever the allocation.
    After each forward, ``last_kv_index`` holds the map that was used: ``(H,)``, or ``(B, H)``
    for per-input schemes.

    Optional pieces, for model families whose attention has them (all absent by default, and
    then the module is exactly the plain one): ``q_norm`` / ``k_norm`` act on each head's
    ``(..., head_dim)`` queries / keys after the projection (one module shared by all heads, so
    a KV head pooled from a group is normalised as every head of it was); ``rotary(t, rope)``
    rotates queries and keys ``(B, heads, N, head_dim)`` by the ``rope`` tensor the parent
    passes to ``forward`` (after the norms, as timm's Eva does); ``out_norm`` normalises the
    concatenated head outputs before ``proj``. Key-driven schemes then score the keys after
    norms and rotation, the keys attention actually uses.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        scheme: str = "gqa",
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        head_dim: int | None = None,
        proj_bias: bool = True,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        rotary: Callable[[Tensor, Tensor], Tensor] | None = None,
        out_norm: nn.Module | None = None,
        **scheme_options: Any,
    ) -> None:
        super().__init__()
        _check_positive_int("dim", dim)
        _check_positive_int("num_heads", num_heads)
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or not (
            1 <= num_kv_heads <= num_heads
        ):
            raise SchemeError(
                f"num_kv_heads must be an integer in [1, num_heads={num_heads}], "
                f"got {num_kv_heads!r}"
            )
        if head_dim is None:
            if dim % num_heads:
                raise SchemeError(
                    f"dim={dim} is not divisible by num_heads={num_heads}; pass head_dim "
                    "explicitly or choose num_heads among the divisors of dim"
                )
            head_dim = dim // num_heads
        _check_positive_int("head_dim", head_dim)
        for name, rate in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= rate < 1.0:
                raise SchemeError(f"{name} must be in [0, 1), got {rate!r}")

        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scheme = scheme
        self.attn_drop = float(attn_drop)
        self.allocator: QueryAllocator = build_allocator(
            scheme, num_heads, num_kv_heads, **scheme_options
        )
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        # Registered only when given, so the plain module's repr and state dict are unchanged.
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.rotary = rotary
        self.out_norm = out_norm
        self.last_kv_index: Tensor | None = None
        #: How uneven or per-sample maps run (``kdgqa.core.ops.grouped_attention``): ``"auto"``
        #: the head-map kernel where it serves, else the expansion; ``"headmap"``, ``"split"``
        #: (static groups, one native-GQA call per group size) or an ``expand_kv`` method
        #: (``"gather"``, ``"onehot"``, ...) to force one, e.g. for benchmarks.
        self.expand_method = "auto"

    @property
    def scheme_options(self) -> dict[str, Any]:
        """The scheme's options, defaults included."""
        return dict(self.allocator.options)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
        rope: Tensor | None = None,
    ) -> Tensor:
        batch, tokens, _ = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).view(batch, tokens, heads + 2 * kv_heads, head_dim)
        # One split (not three slices) so backward assembles the qkv gradient with one cat.
        q, kv = qkv.split([heads, 2 * kv_heads], dim=2)
        q = q.transpose(1, 2)
        if rope is not None and self.rotary is None:
            raise SchemeError("this GroupedQueryAttention was given rope= but has no rotary")
        if self.q_norm is not None or self.k_norm is not None or rope is not None:
            q, kv = self._shape_qk(q, kv, rope)
        kv_index = self.allocator(kv[:, :, :kv_heads].transpose(1, 2))
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
        if self.out_norm is not None:
            out = self.out_norm(out)
        return self.proj_drop(self.proj(out))

    def _shape_qk(self, q: Tensor, kv: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor]:
        """Queries ``(B, H, N, D)`` and token-major K/V ``(B, N, 2G, D)`` with the q/k norms
        and the rotary embedding applied (norms first, as in timm's Eva)."""
        kv_heads = self.num_kv_heads
        k, v = kv.split([kv_heads, kv_heads], dim=2)
        k = k.transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if rope is not None:
            assert self.rotary is not None
            q, k = self.rotary(q, rope), self.rotary(k, rope).type_as(v)
            q = q.type_as(v)
        return q, torch.cat([k.transpose(1, 2), v], dim=2)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of K and V one token occupies in an inference cache for this layer."""
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, scheme={self.scheme!r}"
        )


def start_epoch(model: nn.Module) -> None:
    """Tell every allocator in ``model`` that an epoch starts (reference DGQA resets its step)."""
    for module in model.modules():
        if isinstance(module, QueryAllocator):
            module.start_epoch()
