"""What mean-pooling a group of heads loses, priced from calibration moments.

GQA conversion mean-pools the K/V projections of each group of heads. How much the pooled
KV head differs from the heads it replaces depends on *which* heads share it, and the paper
always takes contiguous runs (heads 0-1, 2-3, ...) whatever the allocation becomes. The
calibrated schemes pick the groups from data instead, once, at conversion time.

What is measured is described in :mod:`kdgqa.calibration.measure`.

**What is minimised.** Mean pooling a group ``S`` gives every head ``i`` in it the key
``k_S = mean_{j in S} k_j`` (weights are pooled, and keys are linear in the weights), so
head ``i`` loses ``d_i = k_i - k_S``. With ``T[i, j, l] = tr(M_i Sigma_jl)`` (``M_i`` a
per-head weighting, ``Sigma_jl = sum_t k_j k_l^T``) the loss of the group is exactly::

    sum_{i in S} T[i,i,i] - (2/|S|) sum_{i,j in S} T[i,i,j] + (1/|S|^2) sum_{i,j,l in S} T[i,j,l]

Two statistics fill in ``M`` and ``Sigma``:

* ``attention`` (default for ``calibrated``): the error of what attention computes. For keys,
  ``M_i`` is head ``i``'s query second moment per token, so the loss is the squared error of
  its attention *logits* ``q_i . d_i``; keys are centred per image first, because a key
  offset shared by all tokens of an image shifts every logit of a query equally and
  softmax ignores it (the key bias drops out entirely). For values, ``M_i = Wo_i^T Wo_i``
  (head ``i``'s block of the output projection), so the loss is the squared error the value
  change causes in the layer's output, before attention averages it (an upper bound).
* ``energy`` (default for ``similarity``): ``M_i = I`` and no centring, i.e. the plain
  squared distance of each head's keys (values) from the group mean: k-means of the heads'
  activations.

The key and the value terms are each divided by their total (the loss of pooling every head
into nothing), so the objective is the fraction of logit (key) plus output (value) energy
lost, and neither term dominates by its units. The search
(:mod:`kdgqa.calibration.partition`) takes the partition of the H heads into G non-empty
groups with the least total loss: by enumeration when the partitions are few (H = 6: 31 for
G = 2, 90 for G = 3), else by steepest-descent moves and swaps from an agglomerative start
plus seeded random restarts. Groups come out uneven where some heads are outliers (a head
unlike the others keeps a KV head to itself).

**Why not the paper's key norms.** A key norm says how large a head's keys are, not which
heads can share one KV head: two heads with equal norms may attend along orthogonal key
directions (pooling them destroys both), and two heads with very different norms may differ
only by a scale or an offset softmax ignores. Norms cannot choose *groups* at all; the
pairwise statistics above can, and they price exactly what mean pooling does. Norms also
drift in training, while a static allocation must be right for the pooled initialisation
it is built with.

The conversion itself (:mod:`kdgqa.conversion.converter`) then permutes each layer's query
heads so every group is a contiguous run, biggest first (and the output projection's input
columns with them, which leaves the function unchanged), pools each KV head from exactly its
group, and stores the group sizes in the allocator: a static allocation that runs at static-
GQA speed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kdgqa.calibration.measure import InputMoments
from kdgqa.errors import SchemeError
from kdgqa.models.base import MHAWeights

__all__ = ["pooling_terms"]


def _augmented(weight: Tensor, bias: Tensor | None, device: torch.device) -> Tensor:
    w = weight.detach().to(device=device, dtype=torch.float64)
    b = (bias.detach().to(device=device, dtype=torch.float64) if bias is not None
         else w.new_zeros(w.shape[0]))
    return torch.cat([w, b[:, None]], dim=1)


def _blocks(weight: Tensor, moment: Tensor, heads: int, dim: int) -> Tensor:
    """``Sigma[j, :, l, :] = W_j S W_l^T`` for all head pairs: ``(H, D, H, D)``."""
    return (weight @ moment @ weight.T).view(heads, dim, heads, dim)


def _normalised(terms: Tensor) -> Tensor:
    total = torch.einsum("iii->", terms)
    return terms / total if float(total) > 0 else torch.zeros_like(terms)


def pooling_terms(
    weights: MHAWeights, moments: InputMoments, statistic: str = "attention",
    values: bool = True,
) -> np.ndarray:
    """The ``(H, H, H)`` tensor ``T`` of the module docstring for one layer (keys, plus
    values when ``values``), each part normalised by its total. ``float64`` numpy."""
    heads, dim = weights.num_heads, weights.head_dim
    device = moments.second.device
    k = _augmented(weights.k_weight, weights.k_bias, device)
    v = _augmented(weights.v_weight, weights.v_bias, device)
    if statistic == "attention":
        q = _augmented(weights.q_weight, weights.q_bias, device)
        q_blocks = _blocks(q, moments.second, heads, dim) / max(moments.tokens, 1)
        q_moment = torch.einsum("iaib->iab", q_blocks)
        centred = moments.second - moments.image_means
        key = torch.einsum("iab,jbla->ijl", q_moment, _blocks(k, centred, heads, dim))
        out = weights.o_weight.detach().to(device=device, dtype=torch.float64)
        out = out.reshape(out.shape[0], heads, dim)
        v_weight = torch.einsum("cia,cib->iab", out, out)
        value = torch.einsum("iab,jbla->ijl", v_weight, _blocks(v, moments.second, heads, dim))
    elif statistic == "energy":
        gram_k = torch.einsum("jala->jl", _blocks(k, moments.second, heads, dim))
        gram_v = torch.einsum("jala->jl", _blocks(v, moments.second, heads, dim))
        key = gram_k.expand(heads, heads, heads)
        value = gram_v.expand(heads, heads, heads)
    else:
        raise SchemeError(f"unknown statistic {statistic!r}; valid: attention, energy")
    terms = _normalised(key)
    if values:
        terms = terms + _normalised(value)
    result: np.ndarray = terms.cpu().numpy()
    return result
