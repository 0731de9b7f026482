"""Mixup and CutMix for training batches, drawn from the run's seed, epoch and step.

Both blend a batch with a permutation of itself: Mixup blends whole images, CutMix pastes a
box of one image into another; the loss blends the two labels with the same weight ``lam``
(drawn from Beta(alpha, alpha); for CutMix corrected to the box's exact area). Every draw comes
from a generator keyed by (seed, epoch, step), so a resumed run mixes exactly as it would have.
Under ``torchrun`` images are paired within each rank's share of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Mixed", "mix_batch"]


@dataclass(frozen=True)
class Mixed:
    """A mixed batch: images, the two label sets and the weight of the first."""

    images: Tensor
    labels: Tensor
    partner_labels: Tensor
    lam: float


def mix_batch(x: Tensor, y: Tensor, *, mixup: float, cutmix: float, prob: float, seed: int,
              epoch: int, step: int) -> Mixed | None:
    """Mix ``x`` (B, C, H, W) with Mixup (``mixup`` = Beta alpha) or CutMix (``cutmix``),
    each batch with probability ``prob`` (one of the two at random when both are on);
    None when this batch stays as it is."""
    if (mixup <= 0 and cutmix <= 0) or x.shape[0] < 2:
        return None
    rng = np.random.default_rng([seed, epoch, step, 0x6D6978])
    if rng.random() >= prob:
        return None
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    partner = x[perm]
    if use_cutmix:
        height, width = x.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        h, w = round(height * cut), round(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - h // 2, 0), min(cy + h - h // 2, height)
        x0, x1 = max(cx - w // 2, 0), min(cx + w - w // 2, width)
        images = x.clone()
        images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        images = lam * x + (1.0 - lam) * partner
    return Mixed(images, y, y[perm], lam)
