"""Head alignment: rotate each head so the heads of a group agree before they are pooled.

A head's basis is arbitrary: rotating its queries and keys by the same orthogonal ``R``
(``q.k = Rq.Rk``), or its values by ``U`` and its output-projection columns by ``U^T``
(``O v = O U^T U v``), leaves the layer's function exactly as it was. Two heads that compute
similar things in different bases average to nothing; rotated into a common basis, their mean
keeps what they share. This is the alignment step of "align attention heads before merging
them" (mha2gqa), done here in closed form from calibration moments.

For each group the rotations solve the generalised Procrustes problem
``min sum_h ||R_h K_h - T||^2`` over the calibration tokens, by alternating ``T`` (the mean of
the rotated heads) and each ``R_h`` (the orthogonal polar factor of ``T S K_h^T``). Keys are
compared centred per image (a key offset shared by every token of an image changes no
attention weight); values are not. Any pooling (``mean``, ``fit``) then works on the rotated
heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from kdgqa.calibration.measure import InputMoments
from kdgqa.conversion.fit import augmented_heads, checked_groups, from_augmented
from kdgqa.models.base import MHAWeights

__all__ = ["ALIGN_ITERATIONS", "align_heads", "group_rotations"]

#: Alternations of the generalised Procrustes fit (it converges in a handful on ViT heads).
ALIGN_ITERATIONS = 20


def group_rotations(blocks: Tensor, metric: Tensor, groups: Sequence[Sequence[int]],
                    iterations: int = ALIGN_ITERATIONS) -> Tensor:
    """``(H, d, d)`` orthogonal rotations that bring the ``(H, d, m)`` head ``blocks`` of each
    group together under the inner product ``metric`` (``(m, m)``, positive semi-definite);
    heads alone in their group keep the identity."""
    heads, dim = blocks.shape[0], blocks.shape[1]
    rotations = torch.eye(dim, dtype=blocks.dtype, device=blocks.device).repeat(heads, 1, 1)
    for group in groups:
        if len(group) < 2:
            continue
        members = blocks[list(group)]
        target = members[0]
        for _ in range(iterations):
            cross = target @ metric @ members.transpose(1, 2)  # (n, d, d): T S K_h^T
            left, _, right = torch.linalg.svd(cross)
            turned = left @ right
            target = (turned @ members).mean(0)
        rotations[list(group)] = turned
    return rotations


def align_heads(weights: MHAWeights, moments: InputMoments, groups: Sequence[Sequence[int]],
                iterations: int = ALIGN_ITERATIONS) -> MHAWeights:
    """``weights`` with every head rotated (queries and keys together, values and output
    columns together) so the heads of each of ``groups`` agree; the same function."""
    heads, dim = weights.num_heads, weights.head_dim
    parts = checked_groups(groups, heads)
    device = weights.q_weight.device
    tokens = max(moments.tokens, 1)
    second = (moments.second / tokens).to(device)
    centred = ((moments.second - moments.image_means) / tokens).to(device)
    q = augmented_heads(weights.q_weight, weights.q_bias, heads)
    k = augmented_heads(weights.k_weight, weights.k_bias, heads)
    v = augmented_heads(weights.v_weight, weights.v_bias, heads)
    turn_qk = group_rotations(k, centred, parts, iterations)
    turn_vo = group_rotations(v, second, parts, iterations)
    o = weights.o_weight.detach().to(torch.float64).reshape(-1, heads, dim)

    q_weight, q_bias = from_augmented(turn_qk @ q, weights.q_weight, weights.q_bias)
    k_weight, k_bias = from_augmented(turn_qk @ k, weights.k_weight, weights.k_bias)
    v_weight, v_bias = from_augmented(turn_vo @ v, weights.v_weight, weights.v_bias)
    o_weight = torch.einsum("chd,hed->che", o, turn_vo).reshape(weights.o_weight.shape)
    return dataclasses.replace(
        weights, q_weight=q_weight, q_bias=q_bias, k_weight=k_weight, k_bias=k_bias,
        v_weight=v_weight, v_bias=v_bias, o_weight=o_weight.to(weights.o_weight.dtype))
