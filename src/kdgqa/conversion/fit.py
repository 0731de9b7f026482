"""Fitted pooling: each group's shared K and V heads solved so the layer stays closest to MHA.

Mean pooling gives a group's KV head the average of its heads' projections, as if every head
counted the same. What the layer computes says otherwise. Write ``W~`` for a projection with
its bias as an extra column, acting on ``x~ = [x, 1]``, and ``S = E[x~ x~^T]`` for the second
moment of the layer's input over calibration tokens.

**Keys.** Query head ``h`` reads its key through the logits ``q_h(t) . k(u)``. Sharing the key
``K`` in a group ``g`` changes them by ``q_h(t) . (K_h - K) x~_u``; over query and key tokens
drawn from the calibration inputs the mean squared change, summed over the group, is

    E_K = sum_{h in g} tr((K_h - K)^T Q_h (K_h - K) S),    Q_h = Q~_h S Q~_h^T,

``Q_h`` being the second moment of head ``h``'s queries. Setting the gradient to zero gives
``sum_h Q_h (K - K_h) S = 0``, so wherever ``S`` is invertible

    K = (sum_h Q_h)^-1 sum_h Q_h K_h:

a mean of the heads' keys weighted, direction by direction, by how strongly each head's
queries look along it. ``S`` cancels; the data enter through the queries.

**Values.** Head ``h`` writes ``O_h v_h`` into the output (``O_h``: its columns of the output
projection). Priced head by head (the attention of each head applied to its own value
error, bounded by the error itself), sharing ``V`` costs

    E_V = sum_{h in g} tr((V_h - V)^T P_h (V_h - V) S),    P_h = O_h^T O_h,

minimised by ``V = (sum_h P_h)^-1 sum_h P_h V_h``: the value directions each head's output
projection amplifies count for more. No calibration data is needed for the values.

Mean pooling is the special case of equal weights (``Q_h`` or ``P_h`` the same for every head
of the group); a group of one head keeps that head exactly, so G = H is the MHA model. A small
ridge pulls directions that no head uses towards the plain mean instead of towards zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdgqa.calibration.measure import InputMoments
from kdgqa.models.base import MHAWeights

__all__ = ["RIDGE", "augmented_heads", "checked_groups", "fitted_kv", "from_augmented",
           "logit_error", "weighted_mean"]

#: Ridge of the weighted means, relative to the mean eigenvalue of the summed weights.
RIDGE = 1e-6


def augmented_heads(weight: Tensor, bias: Tensor | None, heads: int) -> Tensor:
    """``(H, d, C+1)`` per-head projections with the bias as the last column (fp64)."""
    rows = weight.detach().to(torch.float64)
    column = (torch.zeros(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
              if bias is None else bias.detach().to(torch.float64)[:, None])
    return torch.cat([rows, column], dim=1).reshape(heads, -1, rows.shape[1] + 1)


def from_augmented(block: Tensor, weight: Tensor, bias: Tensor | None
                   ) -> tuple[Tensor, Tensor | None]:
    """Undo :func:`augmented_heads`: ``block`` (``(..., d, C+1)``, any leading head axes) as
    a ``(rows, C)`` weight and a bias (None where ``bias`` is), in their dtypes."""
    flat = block.reshape(-1, block.shape[-1])
    return (flat[:, :-1].to(weight.dtype),
            None if bias is None else flat[:, -1].to(bias.dtype))


def weighted_mean(blocks: Tensor, weights: Tensor) -> Tensor:
    """``(sum_h A_h + r I)^-1 (sum_h A_h B_h + r mean_h B_h)`` for ``blocks`` ``B`` of shape
    ``(n, d, m)`` and symmetric positive semi-definite ``weights`` ``A`` of shape ``(n, d, d)``;
    ``r`` is :data:`RIDGE` times the mean eigenvalue of ``sum_h A_h``."""
    total = weights.sum(0)
    dim = total.shape[0]
    ridge = RIDGE * float(total.diagonal().sum()) / dim
    if not ridge > 0:  # no head uses any direction: nothing to weight by
        return blocks.mean(0)
    eye = torch.eye(dim, dtype=total.dtype, device=total.device)
    rhs = torch.einsum("hij,hjk->ik", weights, blocks) + ridge * blocks.mean(0)
    return torch.linalg.solve(total + ridge * eye, rhs)


def checked_groups(groups: Sequence[Sequence[int]], heads: int) -> list[list[int]]:
    """``groups`` as lists, insisting they hold every one of ``heads`` heads once."""
    out = [list(g) for g in groups]
    if sorted(h for g in out for h in g) != list(range(heads)):
        raise ValueError(f"groups {out} must hold each of the {heads} heads once")
    return out


def fitted_kv(weights: MHAWeights, moments: InputMoments, groups: Sequence[Sequence[int]]
              ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """The pooled ``(k_weight, k_bias, v_weight, v_bias)`` of the fitted KV heads, one per
    group in ``groups`` order, in the dtype and device of ``weights``."""
    heads, dim = weights.num_heads, weights.head_dim
    parts = checked_groups(groups, heads)
    device = weights.q_weight.device
    second = (moments.second / max(moments.tokens, 1)).to(device)
    q = augmented_heads(weights.q_weight, weights.q_bias, heads)
    k = augmented_heads(weights.k_weight, weights.k_bias, heads)
    v = augmented_heads(weights.v_weight, weights.v_bias, heads)
    query_moments = q @ second @ q.transpose(1, 2)  # (H, d, d)
    o = weights.o_weight.detach().to(torch.float64).reshape(-1, heads, dim).transpose(0, 1)
    output_gains = o.transpose(1, 2) @ o  # (H, d, d): O_h^T O_h
    keys = torch.cat([weighted_mean(k[g], query_moments[g]) for g in parts])
    values = torch.cat([weighted_mean(v[g], output_gains[g]) for g in parts])
    k_weight, k_bias = from_augmented(keys, weights.k_weight, weights.k_bias)
    v_weight, v_bias = from_augmented(values, weights.v_weight, weights.v_bias)
    return k_weight, k_bias, v_weight, v_bias


def logit_error(weights: MHAWeights, moments: InputMoments, groups: Sequence[Sequence[int]],
                k_weight: Tensor, k_bias: Tensor | None) -> float:
    """``E_K`` summed over groups for the pooled keys ``k_weight``/``k_bias`` (one row block
    per group), relative to the mean squared MHA logit: 0 is MHA's function."""
    heads = weights.num_heads
    parts = checked_groups(groups, heads)
    second = (moments.second / max(moments.tokens, 1)).to(torch.float64)
    q = augmented_heads(weights.q_weight, weights.q_bias, heads).cpu()
    k = augmented_heads(weights.k_weight, weights.k_bias, heads).cpu()
    pooled = augmented_heads(k_weight, k_bias, len(parts)).cpu()
    error = 0.0
    total = 0.0
    for index, group in enumerate(parts):
        for h in group:
            qm = q[h] @ second @ q[h].T
            diff = k[h] - pooled[index]
            error += float(torch.trace(diff.T @ qm @ diff @ second))
            total += float(torch.trace(k[h].T @ qm @ k[h] @ second))
    return error / total if total > 0 else 0.0
