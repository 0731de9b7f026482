"""The report's rows: one per scheme and KV-head count, and the paired interval of its
difference to ``gqa`` (plain records, shared by :mod:`kdgqa.study.report`, which computes
them, and :mod:`kdgqa.study.plots`, which draws them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PairedInterval", "SummaryRow"]


@dataclass(frozen=True)
class PairedInterval:
    """Mean paired difference (scheme - reference) and its 95 % t-interval over ``n`` pairs."""

    mean: float
    low: float
    high: float
    n: int
    #: Sample standard deviation of the per-seed differences (the pair noise).
    sd: float = 0.0


@dataclass(frozen=True)
class SummaryRow:
    scheme: str
    kv_heads: int
    num_heads: int
    n_seeds: int
    acc_mean: float
    acc_std: float
    converted_acc_mean: float
    delta_vs_gqa: PairedInterval | None
    params: int
    kv_cache_bytes_per_token: int
    train_img_per_s: float
    #: The seeds and each seed's test and after-conversion accuracy (what "identical" means).
    seeds: tuple[int, ...] = ()
    seed_accs: tuple[float, ...] = ()
    seed_converted_accs: tuple[float, ...] = ()
    #: True when every run started from a new classifier (a transfer study): accuracy right
    #: after conversion is then chance level by construction and says nothing.
    new_classifier: bool = False
    #: Mean validation loss of the chosen checkpoints.
    val_loss_mean: float = math.nan
    #: Key-driven arms: the share of logged (layer, step) maps that left the even split (for
    #: per-input maps, the share of inputs); None for schemes with a fixed map.
    uneven_share: float | None = None

    @property
    def outcome(self) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
        """What two cells must share to be the same result: seeds and every accuracy."""
        return self.seeds, self.seed_accs, self.seed_converted_accs
