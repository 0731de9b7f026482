"""Planning a calibrated conversion: measure every layer, search its groups, pick per layer.

Each layer's candidate is the partition of its heads whose mean-pooled K/V lose the least
(:mod:`kdgqa.calibration.objective`, searched by :mod:`kdgqa.calibration.partition`); with
``selection="output"`` the model is also run to keep, layer by layer, whichever of that and
the contiguous partition leaves the final features closer to the original
(:mod:`kdgqa.calibration.selection`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdgqa.calibration.measure import first_images, measure
from kdgqa.calibration.objective import pooling_terms
from kdgqa.calibration.partition import (
    PoolingObjective,
    canonical,
    contiguous_groups,
    search_partition,
)
from kdgqa.calibration.selection import select_groups
from kdgqa.errors import SchemeError
from kdgqa.models.locate import AttentionLayer
from kdgqa.schemes.base import CalibrationRequest
from kdgqa.schemes.calibrated import CALIBRATION_SELECTIONS

__all__ = ["RECORDED", "GroupPlan", "plan_groups"]

#: ``convert(..., calibration=RECORDED)`` builds a calibrated model's structure only; its
#: allocation comes from the state dict loaded next (how checkpoints are reloaded).
RECORDED = "recorded"


@dataclass
class GroupPlan:
    """The groups chosen for one layer and what their pooling loses."""

    groups: list[list[int]]
    loss: float
    #: The loss of the paper's contiguous groups, for comparison.
    contiguous_loss: float
    #: With ``selection="output"``: the relative error of the model's final features for
    #: each candidate, ``[least-loss, contiguous]`` (empty when they were the same groups).
    candidate_errors: list[float] = field(default_factory=list)
    counts: list[int] = field(init=False)
    head_order: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = [len(g) for g in self.groups]
        self.head_order = [h for g in self.groups for h in g]


def plan_groups(
    model: nn.Module,
    layers: Sequence[AttentionLayer],
    num_kv_heads: int,
    calibration: Any,
    request: CalibrationRequest,
    build: Callable[[str, list[list[int]]], nn.Module] | None = None,
) -> dict[str, GroupPlan]:
    """Measure ``model`` on ``calibration`` and choose every layer's groups, as ``request``
    asks (statistic, equal groups, values, images, selection).

    ``selection="pooling"``: each layer's least-loss partition. ``"output"``: between that
    and the contiguous partition, whichever leaves the model's final features closer to the
    original on the same images, layer by layer in forward order; needs
    ``build(path, groups)``, the converted module of one layer.
    """
    selection = request.selection
    if selection not in CALIBRATION_SELECTIONS:
        raise SchemeError(f"unknown selection {selection!r}; valid: "
                          f"{', '.join(CALIBRATION_SELECTIONS)}")
    if selection == "output" and build is None:
        raise SchemeError("selection='output' needs build(path, groups)")
    images = first_images(calibration, request.max_images)  # read once: measured, then re-run
    moments = measure(model, [(layer.path, layer.module) for layer in layers], images,
                      request.max_images)
    plans: dict[str, GroupPlan] = {}
    candidates: dict[str, list[list[list[int]]]] = {}
    objectives: dict[str, PoolingObjective] = {}
    for layer in layers:
        path, weights = layer.path, layer.weights
        objective = PoolingObjective(pooling_terms(weights, moments[path], request.statistic,
                                                   request.uses_values))
        groups = search_partition(objective, num_kv_heads, equal=request.equal_groups)
        contiguous = contiguous_groups(weights.num_heads, num_kv_heads)
        plans[path] = GroupPlan(groups, objective.total(groups), objective.total(contiguous))
        objectives[path] = objective
        candidates[path] = [groups] if canonical(groups) == canonical(contiguous) else [
            groups, contiguous]
    if selection == "output":
        assert build is not None
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else None
        on_model = [x.to(device=device, dtype=dtype or x.dtype) for x in images]
        picked = select_groups(model, [layer.path for layer in layers], candidates, on_model,
                               build)
        for path, (groups, errors) in picked.items():
            plans[path] = GroupPlan(groups, objectives[path].total(groups),
                                    plans[path].contiguous_loss, errors)
    return plans
