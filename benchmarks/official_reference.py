"""The official KDGQA code's attention, re-implemented for timing (own code, same execution).

Written from the behaviour described in ``GUIDE.md`` section 1 and the paper, not copied. It
keeps what decides the official code's speed:

* separate ``q``, ``k``, ``v`` projections, queries scaled before ``q @ k^T``;
* attention written out as ``matmul -> softmax -> dropout -> matmul`` (no fused kernel),
  one such chain per KV group in a Python loop over ``torch.split`` of the query heads;
* ``kdgqa``: key norms -> min-max scaling -> rounding -> repair ``while`` loops on a device
  tensor (each test a host sync) -> ``.tolist()`` for the split sizes, every forward pass,
  in training and evaluation;
* ``dgqa-ema`` / ``dgqa-diff``: the same arithmetic without min-max, random +-1 repairs, run
  when a global training step (set by the training loop) is a multiple of ``window_size``,
  and on every evaluation batch (the cache is then overwritten with the batch's norms);
* ``pgqa``: static groups; from each group's output, flattened per head, subtract a noise
  matrix drawn with ``torch.rand`` (one per group, shared by the batch), its diagonal zeroed,
  standardised (zero standard deviations set to one by a masked assignment) and rescaled to
  each output row's mean and std; in training and evaluation.

One deliberate difference: where the official code divides 0 by 0 (equal key norms, or
``diff`` scores that are all zero) its rounding yields NaN and the repair loop never ends;
here NaN counts become 0 (``nan_to_num``, no extra sync) and the repair loop fills them, so a
benchmark cannot hang. The arithmetic is unchanged whenever the official code terminates.

``replace_attention(model, kind, num_kv_heads)`` swaps every timm ``Attention`` of a ViT for
this module, mean-pooling K/V weights into contiguous groups as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdgqa.conversion.pooling import pool_heads
from kdgqa.core.apportion import even_counts

__all__ = ["KINDS", "OfficialStyleAttention", "TrainingClock", "replace_attention"]

KINDS = ("mha", "gqa", "kdgqa", "dgqa-ema", "dgqa-diff", "pgqa")


@dataclass
class TrainingClock:
    """The official code's global training step: the training loop writes it every batch."""

    step: int = 0


def _norm_sums(k: Tensor) -> Tensor:
    """Frobenius norm of each KV head over (tokens x head_dim), summed over the batch."""
    return torch.norm(k, dim=(2, 3)).sum(dim=0)


def _rounded(scores: Tensor, heads: int) -> Tensor:
    counts = (scores / scores.sum(dim=0) * heads).round()
    return torch.nan_to_num(counts, nan=0.0).int()


def minmax_counts(k: Tensor, heads: int) -> list[int]:
    """KDGQA: counts from min-max scaled key norms, repaired by argmax/argmin steps."""
    norms = _norm_sums(k)
    low, high = norms.min(), norms.max()
    counts = _rounded((norms - low) / (high - low), heads)
    while counts.sum() > heads:  # every test reads the device: one sync each
        counts[torch.argmax(counts)] -= 1
    while counts.sum() < heads:
        counts[torch.argmin(counts)] += 1
    return counts.tolist()


def window_counts(scores: Tensor, heads: int) -> list[int]:
    """DGQA: proportional counts repaired by random +-1 steps (indices drawn on the CPU)."""
    counts = _rounded(scores, heads)
    groups = counts.shape[0]
    while counts.sum() > heads:
        pick = int(torch.randint(0, groups, (1,)).item())
        if counts[pick] > 0:
            counts[pick] -= 1
    while counts.sum() < heads:
        pick = int(torch.randint(0, groups, (1,)).item())
        counts[pick] += 1
    return counts.tolist()


def subtract_row_noise(out: Tensor) -> Tensor:
    """PGQA: ``out`` (B, g, N, D) minus rescaled uniform noise, per flattened head row."""
    batch, group, tokens, dim = out.shape
    rows = out.view(batch, group, tokens * dim)
    target_mean = rows.mean(dim=-1, keepdim=True)
    target_std = rows.std(dim=-1, keepdim=True)
    noise = torch.rand(group, tokens * dim, device=out.device)
    diagonal = torch.arange(min(group, tokens * dim))
    noise[diagonal, diagonal] = 0
    noise_mean = noise.mean(dim=-1, keepdim=True)
    noise_std = noise.std(dim=-1, keepdim=True)
    noise_std[noise_std == 0] = 1  # boolean-mask assignment: a host sync, as published
    noise = (noise - noise_mean) / noise_std * target_std + target_mean
    return (rows - noise).view(batch, group, tokens, dim)


class OfficialStyleAttention(nn.Module):
    """Attention executed the way the official code runs it (see the module docstring)."""

    cache: Tensor

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        kind: str,
        qkv_bias: bool = True,
        clock: TrainingClock | None = None,
        window_size: int = 300,
        beta: float = 0.9,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown official kind {kind!r}; valid: {', '.join(KINDS)}")
        if kind == "mha":
            num_kv_heads = num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"the official code needs num_heads % num_kv_heads == 0 (it pools K/V by "
                f"group_size = H // G), got H={num_heads}, G={num_kv_heads}"
            )
        self.kind = kind
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.clock = clock if clock is not None else TrainingClock()
        self.window_size, self.beta = window_size, beta
        kv_width = num_kv_heads * self.head_dim
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, kv_width, bias=qkv_bias)
        self.v = nn.Linear(dim, kv_width, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.splits: list[int] = even_counts(num_heads, num_kv_heads)
        self.register_buffer("cache", torch.zeros(num_kv_heads))

    def _split_sizes(self, k: Tensor) -> list[int]:
        if self.kind == "kdgqa":
            return minmax_counts(k, self.num_heads)
        if self.kind.startswith("dgqa"):
            if self.training and self.clock.step % self.window_size != 0:
                return self.splits
            norms = _norm_sums(k)
            if self.kind == "dgqa-ema":
                scores = self.beta * norms + (1.0 - self.beta) * self.cache
            else:
                scores = (self.cache - norms).abs()
            self.splits = window_counts(scores, self.num_heads)
            norms = norms.detach()
            self.cache = (self.cache + norms) / self.window_size if self.training else norms
            return self.splits
        return self.splits

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        weights = self.attn_drop(F.softmax(q @ k.transpose(-2, -1), dim=-1))
        return weights @ v

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("the official attention has no mask")
        batch, tokens, width = x.shape
        q = self.q(x).view(batch, tokens, self.num_heads, -1).transpose(1, 2) * self.scale
        k = self.k(x).view(batch, tokens, self.num_kv_heads, -1).transpose(1, 2)
        v = self.v(x).view(batch, tokens, self.num_kv_heads, -1).transpose(1, 2)
        if self.kind == "mha":
            out = self._attend(q, k, v)
        else:
            parts = []
            sizes = self._split_sizes(k)
            for q_group, k_head, v_head in zip(
                torch.split(q, sizes, dim=1), k.split(1, dim=1), v.split(1, dim=1), strict=True
            ):
                part = self._attend(q_group, k_head, v_head)
                if self.kind == "pgqa":
                    part = subtract_row_noise(part)
                parts.append(part)
            out = torch.cat(parts, dim=1)
        out = out.transpose(1, 2).contiguous().view(batch, tokens, width)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, heads={self.num_heads}, kv_heads={self.num_kv_heads}"


def _from_timm(attn: nn.Module, kind: str, num_kv_heads: int, clock: TrainingClock,
               window_size: int) -> OfficialStyleAttention:
    qkv: nn.Linear = attn.qkv  # type: ignore[assignment]
    proj: nn.Linear = attn.proj  # type: ignore[assignment]
    heads, dim = int(attn.num_heads), qkv.in_features  # type: ignore[arg-type]
    new = OfficialStyleAttention(dim, heads, num_kv_heads, kind, qkv.bias is not None, clock,
                                 window_size)
    new.to(device=qkv.weight.device, dtype=qkv.weight.dtype)
    g = new.num_kv_heads
    with torch.no_grad():
        weights = qkv.weight.chunk(3, dim=0)
        new.q.weight.copy_(weights[0])
        new.k.weight.copy_(pool_heads(weights[1], heads, g))
        new.v.weight.copy_(pool_heads(weights[2], heads, g))
        if qkv.bias is not None:
            biases = qkv.bias.chunk(3, dim=0)
            new.q.bias.copy_(biases[0])
            new.k.bias.copy_(pool_heads(biases[1], heads, g))
            new.v.bias.copy_(pool_heads(biases[2], heads, g))
        new.proj.weight.copy_(proj.weight)
        new.proj.bias.copy_(proj.bias)
    new.train(attn.training)
    return new


def replace_attention(
    model: nn.Module, kind: str, num_kv_heads: int, window_size: int = 300
) -> TrainingClock:
    """Give every block of a timm ViT the official-style attention; return the shared clock.

    The training loop sets ``clock.step`` before each batch (the official loop sets its global
    step to the batch index, restarting each epoch).
    """
    clock = TrainingClock()
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        raise ValueError("expected a timm VisionTransformer with .blocks")
    for block in blocks:
        attn: Any = block.attn
        block.attn = _from_timm(attn, kind, num_kv_heads, clock, window_size)
    return clock
