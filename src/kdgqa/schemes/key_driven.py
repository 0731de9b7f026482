"""Schemes that choose the map from the keys: KDGQA (every pass), DGQA (norms tracked over
training, refreshed every window) and per-input KDGQA, plus the data-parallel hook that lets
every rank allocate from the global batch."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdgqa.core.apportion import (
    apportion,
    counts_to_kv_index,
    even_counts,
    key_norms,
    reference_dgqa_counts,
    reference_kdgqa_counts,
)
from kdgqa.errors import SchemeError
from kdgqa.schemes.base import QueryAllocator, check_min_queries
from kdgqa.schemes.registry import register_scheme

__all__ = [
    "DGQAAllocator",
    "DGQADiffAllocator",
    "DGQAEmaAllocator",
    "KDGQAAllocator",
    "KeyDrivenAllocator",
    "PerSampleKDGQAAllocator",
    "set_stats_reducer",
]


class KeyDrivenAllocator(QueryAllocator):
    """Shared machinery of the key-driven schemes.

    ``stats_reducer``, when set (``kdgqa.set_stats_reducer``), is applied to the batch-summed
    key norms before they are used, e.g. an all-reduce so every data-parallel rank allocates
    from the global batch and all ranks agree.

    Option ``gain`` (sound mode only, default 1): query heads are shared in proportion to
    ``score ** gain`` instead of ``score``. Mean-pooled KV heads have similar key norms, and
    proportional shares then never pass a rounding threshold (for H = 6, G = 2 one head needs
    62.5 % of the norm to win a query head with ``min_queries=1``): a gain above 1 sharpens
    the shares so the allocation can move at all; 1 is the paper's proportionality.
    """

    key_driven = True
    uniform = False

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        super().__init__(num_heads, num_kv_heads, **options)
        check_min_queries(self.name, self.options["min_queries"], num_heads, num_kv_heads)
        gain = self.options.get("gain", 1.0)
        if isinstance(gain, bool) or not isinstance(gain, int | float) or not (
            0 < gain <= 64 and math.isfinite(gain)
        ):
            raise SchemeError(f"scheme {self.name!r}: gain must be a number in (0, 64], got "
                              f"{gain!r}")
        if gain != 1 and self.options.get("reference", False):
            raise SchemeError(f"scheme {self.name!r}: gain applies to the sound allocation; "
                              "the reference arithmetic has none (use reference=False)")
        self.stats_reducer: Callable[[Tensor], Tensor] | None = None

    def sharpen(self, scores: Tensor) -> Tensor:
        """``scores ** gain`` (scores unchanged for the default gain 1)."""
        gain = self.options.get("gain", 1.0)
        return scores if gain == 1 else scores.float().pow(float(gain))

    def dynamic_reason(self) -> str:
        return (f"scheme {self.name!r} chooses its allocation from the keys on every input, so "
                "no fixed MHA checkpoint is equivalent")

    def batch_norms(self, k: Tensor) -> Tensor:
        """Key norms summed over the batch, ``(G,)`` in fp32, reduced across ranks if set."""
        norms = key_norms(k)
        return norms if self.stats_reducer is None else self.stats_reducer(norms)


@register_scheme
class KDGQAAllocator(KeyDrivenAllocator):
    """Key-distributed GQA: queries per KV head proportional to its key norm, every pass.

    Norms are Frobenius norms over (tokens x head_dim) summed over the batch, as in the paper.
    Default: proportional in fp32 with at least ``min_queries`` per KV head, no host sync
    (one fused kernel on CUDA). ``reference=True``: the official min-max scaling, rounding and
    repair loop, on the host.
    """

    name = "kdgqa"
    option_defaults = MappingProxyType({"reference": False, "min_queries": 1, "gain": 1.0})

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        super().__init__(num_heads, num_kv_heads, **options)
        if self.options["reference"] and num_kv_heads == 1:
            raise SchemeError(
                "scheme 'kdgqa' with reference=True is undefined for num_kv_heads=1 "
                "(min-max scaling of one norm divides 0 by 0); use reference=False or 'mqa'"
            )

    def forward(self, k: Tensor) -> Tensor:
        if self.options["reference"]:
            norms = torch.norm(k.detach(), dim=(2, 3)).sum(dim=0)
            if self.stats_reducer is not None:
                norms = self.stats_reducer(norms)
            counts = torch.tensor(reference_kdgqa_counts(norms, self.num_heads), device=k.device)
            return counts_to_kv_index(counts, self.num_heads)
        if self.stats_reducer is None and self.options["gain"] == 1:
            # The batch sum happens inside the fused apportionment.
            scores, reduce_rows = key_norms(k, per_sample=True), True
        else:
            scores, reduce_rows = self.sharpen(self.batch_norms(k))[None], False
        _, kv_index = apportion(scores, self.num_heads, self.options["min_queries"], reduce_rows)
        return kv_index[0]


class DGQAAllocator(KeyDrivenAllocator):
    """Dynamic GQA: allocation from key norms tracked over training, refreshed every window.

    State (buffers, saved in ``state_dict``): ``step`` (training forward passes seen),
    ``cache`` (tracked key norms), ``updates`` (windows applied) and ``counts`` (the current
    allocation, even until the first window).

    Default: every ``window_size`` training steps the norms of the current batch update an
    exponential moving average ``cache <- beta * norms + (1 - beta) * cache`` (the first window
    takes the norms as they are). ``ema`` allocates in proportion to that average; ``diff``
    in proportion to ``|norms - cache|`` before the update (how much each head moved).
    Evaluation reads the frozen allocation and changes nothing. No host sync: in eager mode a
    host-side mirror of ``step`` decides when a window is due, so the steps in between cost
    one increment; under ``torch.compile`` the decision is made on the device.

    ``reference=True``: the official arithmetic. On steps where ``step % window_size == 0``
    scores are ``beta * norms + (1 - beta) * cache`` (ema) or ``|cache - norms|`` (diff),
    repaired at random, and ``cache <- (cache + norms) / window_size``; in evaluation, every
    batch recomputes the allocation and overwrites ``cache`` with its norms. The official step
    counter restarts every epoch: call ``start_epoch()`` (or ``kdgqa.start_epoch(model)``).
    """

    flavour: ClassVar[str] = "ema"
    option_defaults = MappingProxyType(
        {"reference": False, "min_queries": 1, "window_size": 300, "beta": 0.9, "gain": 1.0}
    )
    step: Tensor
    updates: Tensor
    cache: Tensor
    counts: Tensor
    kv_index: Tensor

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        super().__init__(num_heads, num_kv_heads, **options)
        opts = self.options
        window = opts["window_size"]
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise SchemeError(f"window_size must be an integer >= 1, got {window!r}")
        beta = opts["beta"]
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1:
            raise SchemeError(f"beta must be a number in [0, 1], got {beta!r}")
        counts = torch.tensor(even_counts(num_heads, num_kv_heads))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("cache", torch.zeros(num_kv_heads, dtype=torch.float32))
        self.register_buffer("counts", counts)
        self.register_buffer("kv_index", counts_to_kv_index(counts, num_heads), persistent=False)
        self._host_step: int | None = 0
        self.register_load_state_dict_post_hook(_dgqa_after_load)

    def forward(self, k: Tensor) -> Tensor:
        if self.options["reference"]:
            self._reference_update(k)
        elif self.training:
            if torch.compiler.is_compiling():
                self._window_update(k, due=self.step % self.options["window_size"] == 0)
                self.step.add_(1)
                self._host_step = None
            else:
                self._eager_step(k)
        return self.kv_index

    def _eager_step(self, k: Tensor) -> None:
        if self._host_step is None:  # once after loading or compiled steps
            self._host_step = int(self.step)
        if self._host_step % self.options["window_size"] == 0:
            self._window_update(k, due=None)
        self.step.add_(1)
        self._host_step += 1

    @torch.no_grad()
    def _window_update(self, k: Tensor, due: Tensor | None) -> None:
        """Apply one window; ``due=None`` means it is due for sure (decided on the host)."""
        norms = self.batch_norms(k)
        beta = self.options["beta"]
        first = self.updates == 0
        tracked = torch.where(first, norms, beta * norms + (1.0 - beta) * self.cache)
        if self.flavour == "ema":
            scores = tracked
        else:
            scores = torch.where(first, norms, (norms - self.cache).abs())
        counts, kv_index = apportion(self.sharpen(scores)[None], self.num_heads,
                                     self.options["min_queries"])
        # A batch with non-finite key norms (NaN/inf inputs) is skipped on the device: it
        # would otherwise leave NaN in the cache and freeze the allocation for good.
        finite = torch.isfinite(norms).all()
        due = finite if due is None else due & finite
        self.counts.copy_(torch.where(due, counts[0], self.counts))
        self.kv_index.copy_(torch.where(due, kv_index[0], self.kv_index))
        self.cache.copy_(torch.where(due, tracked, self.cache))
        self.updates.add_(due.long())

    def _reference_scores(self, norms: Tensor, cache: Tensor) -> Tensor:
        if self.flavour == "ema":
            return self.options["beta"] * norms + (1.0 - self.options["beta"]) * cache
        return (cache - norms).abs()

    @torch.no_grad()
    def _reference_update(self, k: Tensor) -> None:
        norms = torch.norm(k, dim=(2, 3)).sum(dim=0).float()
        if self.stats_reducer is not None:
            norms = self.stats_reducer(norms)
        if self.training and int(self.step) % self.options["window_size"] != 0:
            self.step.add_(1)
            return
        counts = reference_dgqa_counts(self._reference_scores(norms, self.cache), self.num_heads)
        self.counts.copy_(torch.tensor(counts))
        self.kv_index.copy_(counts_to_kv_index(self.counts, self.num_heads))
        if self.training:
            self.cache.copy_((self.cache + norms) / self.options["window_size"])
            self.updates.add_(1)
            self.step.add_(1)
        else:
            self.cache.copy_(norms)

    def fixed_kv_index(self) -> Tensor | None:
        """Sound DGQA evaluates with its frozen, learnt allocation; reference DGQA has none."""
        if self.options["reference"]:
            return None
        return counts_to_kv_index(self.counts, self.num_heads)

    def dynamic_reason(self) -> str:
        return "reference DGQA changes its allocation on every evaluation batch"

    def start_epoch(self) -> None:
        if self.options["reference"]:
            self.step.zero_()
            self._host_step = None


def _dgqa_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """Rebuild what is derived from the loaded buffers."""
    assert isinstance(module, DGQAAllocator)
    module.kv_index.copy_(counts_to_kv_index(module.counts, module.num_heads))
    module._host_step = None


@register_scheme
class DGQAEmaAllocator(DGQAAllocator):
    """DGQA allocating in proportion to the tracked (moving-average) key norms."""

    name = "dgqa-ema"
    flavour = "ema"


@register_scheme
class DGQADiffAllocator(DGQAAllocator):
    """DGQA allocating in proportion to how much each KV head's key norm moved in a window."""

    name = "dgqa-diff"
    flavour = "diff"


@register_scheme
class PerSampleKDGQAAllocator(KeyDrivenAllocator):
    """KDGQA with one allocation per input, chosen from that input's own keys.

    The paper sums key norms over the batch, so an image's head map (and so its prediction)
    depends on the other images it is batched with, and on the batch size at evaluation.
    Here each input's Frobenius key norms (tokens x head_dim, fp32) are apportioned on their
    own row: ``forward`` returns a ``(B, H)`` map, which the attention op consumes in the
    same single gather + SDPA call as a shared map. Nothing is reduced across the batch or
    across data-parallel ranks (``stats_reducer`` is ignored), so an input's allocation is
    the same whatever batch, position or rank it is in, and evaluation is independent of
    the batch size (up to the bitwise reproducibility of the projection's matmul across
    batch sizes, which decides exact ties). ``min_queries`` (default 1) keeps every KV head
    in use for every input. No host sync; on CUDA the apportionment is the same fused
    Triton kernel, one program per input.

    A distinct scheme rather than a ``per_sample`` option of ``kdgqa``: its maps have
    another shape, it has no official reference behaviour, it needs no DDP reducer, and a
    separate name keeps it a separate row in studies and reports.
    """

    name = "kdgqa-ps"
    option_defaults = MappingProxyType({"min_queries": 1, "gain": 1.0})

    def forward(self, k: Tensor) -> Tensor:
        scores = self.sharpen(key_norms(k, per_sample=True))
        _, kv_index = apportion(scores, self.num_heads, self.options["min_queries"])
        return kv_index


def set_stats_reducer(model: nn.Module, reducer: Callable[[Tensor], Tensor] | None) -> None:
    """Install ``reducer`` (e.g. a sum all-reduce) on every key-driven allocator in ``model``."""
    for module in model.modules():
        if isinstance(module, KeyDrivenAllocator):
            module.stats_reducer = reducer
