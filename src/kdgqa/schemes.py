"""Query allocators: one small module per scheme, chosen by name.

An allocator decides, on each forward pass, which KV head every query head reads
(``forward(k) -> kv_index`` of shape ``(H,)``), and may perturb the attention output
(``perturb``). Allocators that keep state (DGQA) hold it in buffers, so it travels with
``state_dict`` and is never global. The registry is a read-only mapping built once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdgqa.allocation import (
    apportion,
    counts_to_kv_index,
    even_counts,
    key_norms,
    reference_dgqa_counts,
    reference_kdgqa_counts,
)
from kdgqa.perturb import perturb_rows

__all__ = [
    "SCHEMES",
    "QueryAllocator",
    "available_schemes",
    "build_allocator",
    "set_stats_reducer",
]


class QueryAllocator(nn.Module):
    """Base class: a static, even, contiguous allocation."""

    name: ClassVar[str] = ""
    #: Options a user may pass by keyword, with their defaults.
    option_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: True when the allocation is chosen from the keys at run time.
    key_driven: ClassVar[bool] = False
    #: True when the map is fixed and every KV head serves H // G contiguous query heads,
    #: which lets the attention op use SDPA's native ``enable_gqa`` path.
    uniform: bool = True
    #: True when ``kdgqa.convert`` must measure the model on calibration images first.
    needs_calibration: ClassVar[bool] = False
    #: Group sizes as host ints when the map is fixed, uneven and contiguous (the query heads
    #: of KV head ``g`` are the ``host_counts[g]`` after those of ``g - 1``): the attention op
    #: can then run one native-GQA call per group size with no host sync.
    host_counts: tuple[int, ...] | None = None
    static_kv_index: Tensor

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        super().__init__()
        if not 1 <= num_kv_heads <= num_heads:
            raise ValueError(f"num_kv_heads must be in [1, num_heads={num_heads}], got "
                             f"{num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            valid = ", ".join(sorted(self.option_defaults)) or "none"
            raise ValueError(
                f"unknown option {unknown[0]!r} for scheme {self.name!r}; valid options: {valid}"
            )
        for key, value in options.items():
            if isinstance(self.option_defaults[key], bool) and not isinstance(value, bool):
                raise ValueError(f"option {key!r} of scheme {self.name!r} must be true or "
                                 f"false, got {value!r}")
        self.options = {**self.option_defaults, **options}
        counts = torch.tensor(even_counts(num_heads, num_kv_heads))
        self.register_buffer("static_kv_index", counts_to_kv_index(counts, num_heads),
                             persistent=False)

    def forward(self, k: Tensor) -> Tensor:
        """Return the query-head -> KV-head map for keys ``k`` of shape ``(B, G, N, D)``."""
        return self.static_kv_index

    def perturb(self, out: Tensor, kv_index: Tensor) -> Tensor:
        """Hook on the attention output ``(B, H, N, D)``; identity except for PGQA."""
        return out

    def start_epoch(self) -> None:
        """Hook for the training loop at each epoch start (only reference DGQA uses it)."""

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}{opts}"


def _require_divisible(name: str, num_heads: int, num_kv_heads: int) -> None:
    if num_heads % num_kv_heads:
        divisors = [g for g in range(1, num_heads + 1) if num_heads % g == 0]
        raise ValueError(
            f"scheme {name!r} needs num_heads divisible by num_kv_heads, got "
            f"num_heads={num_heads}, num_kv_heads={num_kv_heads}; valid num_kv_heads: "
            f"{divisors} (key-driven schemes accept uneven groups)"
        )


class MHAAllocator(QueryAllocator):
    """Multi-head attention: one KV head per query head."""

    name = "mha"

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        if num_kv_heads != num_heads:
            raise ValueError(
                f"scheme 'mha' needs num_kv_heads == num_heads ({num_heads}), "
                f"got num_kv_heads={num_kv_heads}"
            )
        super().__init__(num_heads, num_kv_heads, **options)


class MQAAllocator(QueryAllocator):
    """Multi-query attention: every query head shares the single KV head."""

    name = "mqa"

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        if num_kv_heads != 1:
            raise ValueError(f"scheme 'mqa' needs num_kv_heads == 1, got {num_kv_heads}")
        super().__init__(num_heads, num_kv_heads, **options)


class GQAAllocator(QueryAllocator):
    """Uniform grouped-query attention: H // G contiguous query heads per KV head."""

    name = "gqa"

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        _require_divisible(self.name, num_heads, num_kv_heads)
        super().__init__(num_heads, num_kv_heads, **options)


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
        #: How the perturbation runs (``kdgqa.perturb.PERTURB_METHODS``); all compute the
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
        # One fused op with a closed-form backward (kdgqa.perturb); any layout of ``out``.
        return perturb_rows(out, unit, self.perturb_method)


class KeyDrivenAllocator(QueryAllocator):
    """Shared machinery of the key-driven schemes.

    ``stats_reducer``, when set (``kdgqa.set_stats_reducer``), is applied to the batch-summed
    key norms before they are used, e.g. an all-reduce so every data-parallel rank allocates
    from the global batch and all ranks agree.
    """

    key_driven = True
    uniform = False

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        super().__init__(num_heads, num_kv_heads, **options)
        _check_min_queries(self.name, self.options["min_queries"], num_heads, num_kv_heads)
        self.stats_reducer: Callable[[Tensor], Tensor] | None = None

    def batch_norms(self, k: Tensor) -> Tensor:
        """Key norms summed over the batch, ``(G,)`` in fp32, reduced across ranks if set."""
        norms = key_norms(k)
        return norms if self.stats_reducer is None else self.stats_reducer(norms)


class KDGQAAllocator(KeyDrivenAllocator):
    """Key-distributed GQA: queries per KV head proportional to its key norm, every pass.

    Norms are Frobenius norms over (tokens x head_dim) summed over the batch, as in the paper.
    Default: proportional in fp32 with at least ``min_queries`` per KV head, no host sync
    (one fused kernel on CUDA). ``reference=True``: the official min-max scaling, rounding and
    repair loop, on the host.
    """

    name = "kdgqa"
    option_defaults = MappingProxyType({"reference": False, "min_queries": 1})

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        super().__init__(num_heads, num_kv_heads, **options)
        if self.options["reference"] and num_kv_heads == 1:
            raise ValueError(
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
        if self.stats_reducer is None:
            scores, reduce_rows = key_norms(k, per_sample=True), True
        else:
            scores, reduce_rows = self.batch_norms(k)[None], False
        _, kv_index = apportion(scores, self.num_heads, self.options["min_queries"], reduce_rows)
        return kv_index[0]


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
    option_defaults = MappingProxyType({"min_queries": 1})

    def forward(self, k: Tensor) -> Tensor:
        scores = key_norms(k, per_sample=True)
        _, kv_index = apportion(scores, self.num_heads, self.options["min_queries"])
        return kv_index


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
        {"reference": False, "min_queries": 1, "window_size": 300, "beta": 0.9}
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
            raise ValueError(f"window_size must be an integer >= 1, got {window!r}")
        beta = opts["beta"]
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
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
        counts, kv_index = apportion(scores[None], self.num_heads, self.options["min_queries"])
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

    def start_epoch(self) -> None:
        if self.options["reference"]:
            self.step.zero_()
            self._host_step = None


def _dgqa_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """Rebuild what is derived from the loaded buffers."""
    assert isinstance(module, DGQAAllocator)
    module.kv_index.copy_(counts_to_kv_index(module.counts, module.num_heads))
    module._host_step = None


class DGQAEmaAllocator(DGQAAllocator):
    name = "dgqa-ema"
    flavour = "ema"


class DGQADiffAllocator(DGQAAllocator):
    name = "dgqa-diff"
    flavour = "diff"


#: Statistics a calibrated scheme can measure (see ``kdgqa.calibrate``).
CALIBRATION_STATISTICS = ("attention", "energy")
#: How a calibrated scheme picks each layer's groups among candidates (``kdgqa.calibrate``).
CALIBRATION_SELECTIONS = ("output", "pooling")


class CalibratedAllocator(QueryAllocator):
    """A static, possibly uneven allocation measured on calibration images at conversion.

    ``kdgqa.convert(model, "calibrated", G, calibration=images)`` measures every attention
    layer on the images, picks the partition of the H original heads into G groups whose
    mean-pooled K/V lose the least (``kdgqa.calibrate``), permutes the query heads (and the
    output projection's columns) so each group is a contiguous run, biggest groups first,
    and pools each KV head from exactly the heads it serves. The allocator then only holds
    the result: ``counts`` (queries per KV head) and ``head_order`` (the original head at
    each query position), both saved in the ``state_dict``. The map never changes, so it
    costs nothing at run time: uneven groups run as one native-GQA SDPA call per distinct
    group size (``kdgqa.ops.grouped_attention``), equal groups as plain static GQA.

    Options: ``calibration_images`` (how many images to measure, default 512),
    ``statistic`` (``attention``, default: error of the attention logits and outputs;
    ``energy``: plain key/value energy; see ``kdgqa.calibrate``) and ``selection``
    (``output``, default: per layer, the least-loss or the contiguous partition, whichever
    leaves the model's final features closer to the original on the calibration images,
    see ``kdgqa.selection``; ``pooling``: the least-loss partition alone). Built without
    calibration (or before its state is loaded), it is static GQA with even contiguous groups.
    """

    name = "calibrated"
    needs_calibration = True
    #: Whether groups must all have H // G heads (the similarity baseline).
    equal_groups: ClassVar[bool] = False
    #: Whether the value pooling error counts in the objective (keys always do).
    uses_values: ClassVar[bool] = True
    option_defaults = MappingProxyType({"calibration_images": 512, "statistic": "attention",
                                        "selection": "output"})
    counts: Tensor
    head_order: Tensor

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        if self.equal_groups:
            _require_divisible(self.name, num_heads, num_kv_heads)
        super().__init__(num_heads, num_kv_heads, **options)
        images = self.options["calibration_images"]
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise ValueError(f"scheme {self.name!r}: calibration_images must be an integer "
                             f">= 1, got {images!r}")
        if self.options["selection"] not in CALIBRATION_SELECTIONS:
            raise ValueError(
                f"scheme {self.name!r}: unknown selection {self.options['selection']!r}; "
                f"valid: {', '.join(CALIBRATION_SELECTIONS)}"
            )
        if self.options["statistic"] not in CALIBRATION_STATISTICS:
            raise ValueError(
                f"scheme {self.name!r}: unknown statistic {self.options['statistic']!r}; "
                f"valid: {', '.join(CALIBRATION_STATISTICS)}"
            )
        counts = even_counts(num_heads, num_kv_heads)
        self.register_buffer("counts", torch.tensor(counts))
        self.register_buffer("head_order", torch.arange(num_heads))
        self._use_counts(counts)
        self.register_load_state_dict_post_hook(_calibrated_after_load)

    def _use_counts(self, counts: Sequence[int]) -> None:
        self.host_counts = tuple(int(c) for c in counts)
        self.uniform = len(set(self.host_counts)) == 1
        counts_t = torch.tensor(self.host_counts, device=self.static_kv_index.device)
        self.static_kv_index.copy_(counts_to_kv_index(counts_t, self.num_heads))

    def check_groups(self, counts: Sequence[int], head_order: Sequence[int]) -> None:
        """Raise ``ValueError`` unless ``counts``/``head_order`` describe a valid allocation."""
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if len(counts) != kv_heads or any(int(c) < 1 for c in counts) or sum(counts) != heads:
            raise ValueError(f"scheme {self.name!r}: counts {list(counts)} must be "
                             f"{kv_heads} integers >= 1 summing to {heads}")
        if self.equal_groups and len(set(counts)) != 1:
            raise ValueError(f"scheme {self.name!r} needs equal groups, got counts "
                             f"{list(counts)}")
        if sorted(int(h) for h in head_order) != list(range(heads)):
            raise ValueError(f"scheme {self.name!r}: head_order {list(head_order)} is not a "
                             f"permutation of range({heads})")

    def set_groups(self, counts: Sequence[int], head_order: Sequence[int]) -> None:
        """Install an allocation: ``counts[g]`` contiguous query heads per KV head ``g``;
        query position ``p`` holds original head ``head_order[p]`` (for the record)."""
        self.check_groups(counts, head_order)
        self.counts.copy_(torch.tensor([int(c) for c in counts]))
        self.head_order.copy_(torch.tensor([int(h) for h in head_order]))
        self._use_counts(counts)

    def groups(self) -> list[list[int]]:
        """The original heads pooled into each KV head, in KV-head order."""
        order = self.head_order.tolist()
        out, start = [], 0
        for count in self.counts.tolist():
            out.append(order[start:start + count])
            start += count
        return out


def _calibrated_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """Check the loaded allocation and rebuild the host copy and map derived from it."""
    assert isinstance(module, CalibratedAllocator)
    if module.counts.device.type == "meta":
        return
    counts, order = module.counts.tolist(), module.head_order.tolist()
    module.check_groups(counts, order)
    module._use_counts(counts)


class SimilarityAllocator(CalibratedAllocator):
    """Baseline: equal groups of heads whose keys are most alike, measured on calibration.

    Like ``calibrated`` but every KV head serves exactly H // G query heads and only the
    keys' pooling error counts: the partition clusters heads by key similarity (with the
    default ``statistic="energy"``, k-means of the heads' key activations into equal
    clusters, solved exactly when small). Groups are permuted to contiguous runs and
    pooled from their own heads, so it runs as plain static GQA (native ``enable_gqa``).
    """

    name = "similarity"
    equal_groups = True
    uses_values = False
    option_defaults = MappingProxyType({"calibration_images": 512, "statistic": "energy",
                                        "selection": "pooling"})


def set_stats_reducer(model: nn.Module, reducer: Callable[[Tensor], Tensor] | None) -> None:
    """Install ``reducer`` (e.g. a sum all-reduce) on every key-driven allocator in ``model``."""
    for module in model.modules():
        if isinstance(module, KeyDrivenAllocator):
            module.stats_reducer = reducer


def _check_min_queries(name: str, min_queries: Any, num_heads: int, num_kv_heads: int) -> None:
    limit = num_heads // num_kv_heads
    if isinstance(min_queries, bool) or not isinstance(min_queries, int) or not (
        0 <= min_queries <= limit
    ):
        raise ValueError(
            f"scheme {name!r}: min_queries must be an integer in [0, {limit}] for "
            f"num_heads={num_heads}, num_kv_heads={num_kv_heads}; got {min_queries!r}"
        )


SCHEMES: Mapping[str, type[QueryAllocator]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            MHAAllocator,
            MQAAllocator,
            GQAAllocator,
            PGQAAllocator,
            KDGQAAllocator,
            DGQAEmaAllocator,
            DGQADiffAllocator,
            PerSampleKDGQAAllocator,
            CalibratedAllocator,
            SimilarityAllocator,
        )
    }
)


def available_schemes() -> list[str]:
    """Names accepted by ``GroupedQueryAttention(scheme=...)`` and ``kdgqa.convert``."""
    return list(SCHEMES)


def build_allocator(
    scheme: str, num_heads: int, num_kv_heads: int, **options: Any
) -> QueryAllocator:
    """Instantiate the allocator registered under ``scheme``."""
    try:
        cls = SCHEMES[scheme]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}"
        ) from None
    return cls(num_heads, num_kv_heads, **options)
