"""Slow, obvious implementations the tests compare the library against (written here, in
loops, without the library's arithmetic)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from kdgqa import GroupedQueryAttention


def naive_attention(
    module: GroupedQueryAttention, x: Tensor, kv_index: Tensor, noise_seed: int | None,
    causal: bool = False,
) -> Tensor:
    """softmax(q_h k_g^T / sqrt(d)) v_g for every query head h and g = kv_index[h]."""
    batch, tokens, _ = x.shape
    heads, kv_heads, dim = module.num_heads, module.num_kv_heads, module.head_dim
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias).view(batch, tokens, -1, dim)
    q, k, v = qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads], qkv[:, :, heads + kv_heads:]
    outs = []
    for h in range(heads):
        g = int(kv_index[h])
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / dim**0.5
        if causal:
            mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(scores.softmax(-1) @ v[:, :, g])
    out = torch.stack(outs, 1)  # (B, H, N, D)
    if noise_seed is not None:
        torch.manual_seed(noise_seed)
        flat = out.reshape(batch, heads, -1)
        noise = torch.rand(heads, tokens * dim)
        group = heads // kv_heads
        for h in range(heads):  # zero the diagonal of each group's noise matrix
            if h % group < tokens * dim:
                noise[h, h % group] = 0
        # The noise is drawn and standardised in fp32 with the same reduction as the module,
        # so both see the same unit noise bit for bit; what follows runs in x's dtype.
        noise_std, noise_mean = torch.std_mean(noise, dim=-1, keepdim=True)
        noise = ((noise - noise_mean) / noise_std).to(flat.dtype)
        flat = flat - (noise * flat.std(-1, keepdim=True) + flat.mean(-1, keepdim=True))
        out = flat.view(batch, heads, tokens, dim)
    out = out.transpose(1, 2).reshape(batch, tokens, heads * dim)
    return F.linear(out, module.proj.weight, module.proj.bias)


def all_partitions(n: int, k: int, equal: bool = False) -> list[list[list[int]]]:
    """Brute force: every labelling of n heads with k labels, deduplicated."""
    seen, out = set(), []
    for labels in itertools.product(range(k), repeat=n):
        groups = [[h for h in range(n) if labels[h] == g] for g in range(k)]
        if any(not g for g in groups) or (equal and len({len(g) for g in groups}) > 1):
            continue
        key = tuple(sorted(tuple(g) for g in groups))
        if key not in seen:
            seen.add(key)
            out.append([list(g) for g in key])
    return out


def pooled_mha(model: torch.nn.Module, groups: int) -> torch.nn.Module:
    """A copy of MHA ``model`` whose K/V projections are replaced, head by head, by the mean
    of their contiguous group of ``groups``: still MHA, written through each family's
    ``write_attention``. A grouped conversion with mean pooling must compute exactly this."""
    import copy
    from dataclasses import replace

    from kdgqa.models import find_attention

    ref = copy.deepcopy(model)
    for layer in find_attention(ref):
        w = layer.weights
        heads, dim = w.num_heads, w.head_dim

        def pool(t: Tensor | None, heads: int = heads, dim: int = dim) -> Tensor | None:
            if t is None:
                return None
            rows = t.reshape(groups, heads // groups, dim, *t.shape[1:])
            return rows.mean(1, keepdim=True).expand_as(rows).reshape(t.shape).clone()

        layer.family.write_attention(layer.module, replace(
            w, k_weight=pool(w.k_weight), v_weight=pool(w.v_weight), k_bias=pool(w.k_bias),
            v_bias=pool(w.v_bias)))
    return ref


def assert_close_logits(got: Tensor, want: Tensor) -> None:
    """Within 1e-5 of the logits' scale: fp32, a few hundred accumulations per logit."""
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
