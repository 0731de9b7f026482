"""Schemes whose static, possibly uneven groups are chosen from calibration images when a
model is converted: ``calibrated`` (least pooling loss) and ``similarity`` (equal groups of
alike keys, a baseline). The measuring and searching live in :mod:`kdgqa.calibration`."""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdgqa.core.apportion import counts_to_kv_index, even_counts
from kdgqa.errors import SchemeError
from kdgqa.schemes.base import CalibrationRequest, QueryAllocator, check_divisible
from kdgqa.schemes.registry import register_scheme

__all__ = [
    "CALIBRATION_SELECTIONS",
    "CALIBRATION_STATISTICS",
    "CalibratedAllocator",
    "SimilarityAllocator",
]

CALIBRATION_STATISTICS = ("attention", "energy")
#: How a calibrated scheme picks each layer's groups among candidates (``kdgqa.calibration.plan``).
CALIBRATION_SELECTIONS = ("output", "pooling")


@register_scheme
class CalibratedAllocator(QueryAllocator):
    """A static, possibly uneven allocation measured on calibration images at conversion.

    ``kdgqa.convert(model, "calibrated", G, calibration=images)`` measures every attention
    layer on the images, picks the partition of the H original heads into G groups whose
    mean-pooled K/V lose the least (``kdgqa.calibration.objective``), permutes the query heads
    (and the output projection's columns) so each group is a contiguous run, biggest groups first,
    and pools each KV head from exactly the heads it serves. The allocator then only holds
    the result: ``counts`` (queries per KV head) and ``head_order`` (the original head at
    each query position), both saved in the ``state_dict``. The map never changes, so it
    costs nothing at run time: uneven groups run as one native-GQA SDPA call per distinct
    group size (``kdgqa.core.ops.grouped_attention``), equal groups as plain static GQA.

    Options: ``calibration_images`` (how many images to measure, default 512),
    ``statistic`` (``attention``, default: error of the attention logits and outputs;
    ``energy``: plain key/value energy; see ``kdgqa.calibration.objective``) and ``selection``
    (``output``, default: per layer, the least-loss or the contiguous partition, whichever
    leaves the model's final features closer to the original on the calibration images,
    see ``kdgqa.calibration.selection``; ``pooling``: the least-loss partition alone). Built without
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
            check_divisible(self.name, num_heads, num_kv_heads)
        super().__init__(num_heads, num_kv_heads, **options)
        images = self.options["calibration_images"]
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise SchemeError(f"scheme {self.name!r}: calibration_images must be an integer "
                             f">= 1, got {images!r}")
        if self.options["selection"] not in CALIBRATION_SELECTIONS:
            raise SchemeError(
                f"scheme {self.name!r}: unknown selection {self.options['selection']!r}; "
                f"valid: {', '.join(CALIBRATION_SELECTIONS)}"
            )
        if self.options["statistic"] not in CALIBRATION_STATISTICS:
            raise SchemeError(
                f"scheme {self.name!r}: unknown statistic {self.options['statistic']!r}; "
                f"valid: {', '.join(CALIBRATION_STATISTICS)}"
            )
        counts = even_counts(num_heads, num_kv_heads)
        self.register_buffer("counts", torch.tensor(counts))
        self.register_buffer("head_order", torch.arange(num_heads))
        self._use_counts(counts)
        self.register_load_state_dict_post_hook(_calibrated_after_load)

    def calibration_request(self) -> CalibrationRequest:
        return CalibrationRequest(
            statistic=self.options["statistic"], equal_groups=self.equal_groups,
            uses_values=self.uses_values, max_images=self.options["calibration_images"],
            selection=self.options["selection"])

    def _use_counts(self, counts: Sequence[int]) -> None:
        self.host_counts = tuple(int(c) for c in counts)
        self.uniform = len(set(self.host_counts)) == 1
        counts_t = torch.tensor(self.host_counts, device=self.static_kv_index.device)
        self.static_kv_index.copy_(counts_to_kv_index(counts_t, self.num_heads))

    def check_groups(self, counts: Sequence[int], head_order: Sequence[int]) -> None:
        """Raise ``SchemeError`` unless ``counts``/``head_order`` describe a valid allocation."""
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if len(counts) != kv_heads or any(int(c) < 1 for c in counts) or sum(counts) != heads:
            raise SchemeError(f"scheme {self.name!r}: counts {list(counts)} must be "
                             f"{kv_heads} integers >= 1 summing to {heads}")
        if self.equal_groups and len(set(counts)) != 1:
            raise SchemeError(f"scheme {self.name!r} needs equal groups, got counts "
                             f"{list(counts)}")
        if sorted(int(h) for h in head_order) != list(range(heads)):
            raise SchemeError(f"scheme {self.name!r}: head_order {list(head_order)} is not a "
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


@register_scheme
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
