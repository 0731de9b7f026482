"""Calibrated static allocation: measure the heads on images, group them, pool each group.

GQA conversion mean-pools the K/V projections of each group of heads. How much the pooled
KV head differs from the heads it replaces depends on *which* heads share it, and the paper
always takes contiguous runs (heads 0-1, 2-3, ...) whatever the allocation becomes. This
module picks the groups from data instead, once, at conversion time.

**What is measured.** A forward pre-hook on every attention layer accumulates, in fp64,
the second moment of the layer's input ``x`` augmented with a constant 1
(``sum_t [x_t, 1][x_t, 1]^T``) and the same for the per-image token means. Every query,
key and value is an affine function of ``x``, so any second moment between heads follows
exactly from these and the weights: ``sum_t k_i k_j^T = Wk_i S Wk_j^T`` (bias folded in).
The cost is one ``(C+1) x (C+1)`` matrix per layer, whatever the number of images.

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
lost, and neither term dominates by its units. The search (``kdgqa.partition``) takes the
partition of the H heads into G non-empty groups with the least total loss: by enumeration
when the partitions are few (H = 6: 31 for G = 2, 90 for G = 3), else by steepest-descent
moves and swaps from an agglomerative start plus seeded random restarts. Groups come out
uneven where some heads are outliers (a head unlike the others keeps a KV head to itself).

**Why not the paper's key norms.** A key norm says how large a head's keys are, not which
heads can share one KV head: two heads with equal norms may attend along orthogonal key
directions (pooling them destroys both), and two heads with very different norms may differ
only by a scale or an offset softmax ignores. Norms cannot choose *groups* at all; the
pairwise statistics above can, and they price exactly what mean pooling does. Norms also
drift in training, while a static allocation must be right for the pooled initialisation
it is built with.

The conversion itself (``kdgqa.convert``) then permutes each layer's query heads so every
group is a contiguous run, biggest first (and the output projection's input columns with
them, which leaves the function unchanged), pools each KV head from exactly its group, and
stores the group sizes in the allocator: a static allocation that runs at static-GQA speed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdgqa.convert import ConversionError, MHAWeights
from kdgqa.partition import (
    PoolingObjective,
    canonical,
    contiguous_groups,
    search_partition,
)

__all__ = [
    "RECORDED",
    "SELECTIONS",
    "GroupPlan",
    "InputMoments",
    "measure",
    "plan_groups",
    "pooling_terms",
]

#: ``convert(..., calibration=RECORDED)`` builds a calibrated model's structure only; its
#: allocation comes from the state dict loaded next (how checkpoints are reloaded).
RECORDED = "recorded"
#: Images per forward pass while measuring.
BATCH_SIZE = 64
#: How a layer's groups are picked among candidates (see :func:`plan_groups`).
SELECTIONS = ("output", "pooling")


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class InputMoments:
    """Second moments of one attention layer's input over the calibration tokens (fp64).

    ``second`` is ``sum_t x~_t x~_t^T`` with ``x~ = [x, 1]``; ``image_means`` is
    ``sum_b n_b m~_b m~_b^T`` for the per-image token means ``m~_b``, so ``second -
    image_means`` is the second moment of the tokens centred per image.
    """

    second: Tensor
    image_means: Tensor
    tokens: int = 0
    images: int = 0

    @classmethod
    def zeros(cls, width: int, device: torch.device) -> InputMoments:
        shape = (width + 1, width + 1)
        return cls(torch.zeros(shape, dtype=torch.float64, device=device),
                   torch.zeros(shape, dtype=torch.float64, device=device))

    def add(self, x: Tensor) -> None:
        """Accumulate a batch of layer inputs ``(B, N, C)``."""
        batch, tokens, width = x.shape
        ones = x.new_ones(batch, tokens, 1, dtype=torch.float64)
        aug = torch.cat([x.detach().to(torch.float64), ones], dim=-1)
        flat = aug.reshape(-1, width + 1)
        self.second += flat.T @ flat
        means = aug.mean(dim=1)
        self.image_means += tokens * (means.T @ means)
        self.tokens += batch * tokens
        self.images += batch


def _layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return kwargs.get("hidden_states", kwargs.get("x"))


def _image_batches(calibration: Any, batch_size: int) -> Iterator[Tensor]:
    """Batches ``(b, C, H, W)`` from a tensor of images or an iterable of batches."""
    if isinstance(calibration, Tensor):
        items: Iterable[Any] = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        items = calibration
    else:
        raise ConversionError(
            f"calibration must be images (N, C, H, W) as a tensor or an iterable of such "
            f"batches, got {type(calibration).__qualname__}"
        )
    for item in items:
        if isinstance(item, (tuple, list)) and item:  # (images, labels) pairs
            item = item[0]
        if not isinstance(item, Tensor) or item.dim() != 4 or not item.is_floating_point():
            shape = tuple(item.shape) if isinstance(item, Tensor) else type(item).__qualname__
            raise ConversionError(
                f"calibration images must be float tensors (N, C, H, W) normalised like the "
                f"model's inputs, got {shape}"
            )
        yield from item.split(batch_size)


def measure(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    calibration: Any,
    max_images: int,
    batch_size: int = BATCH_SIZE,
) -> dict[str, InputMoments]:
    """Run ``model`` (in eval mode, no grad) on up to ``max_images`` calibration images and
    return the input moments of each of ``modules``, keyed by path. The model is left as it
    was (training flags included); raises :class:`ConversionError` on unusable input."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    moments: dict[str, InputMoments] = {}

    def hook_for(path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _layer_input(args, kwargs)
            if not isinstance(x, Tensor) or x.dim() != 3:
                raise ConversionError(f"cannot calibrate {path!r}: its input is not a "
                                      "(batch, tokens, channels) tensor")
            if path not in moments:
                moments[path] = InputMoments.zeros(x.shape[-1], x.device)
            moments[path].add(x)

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(hook_for(p), with_kwargs=True) for p, m in modules]
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in _image_batches(calibration, batch_size):
                batch = batch[: max_images - seen]
                try:
                    model(batch.to(device=device, dtype=dtype))
                except ConversionError:
                    raise
                except (RuntimeError, TypeError, ValueError, AssertionError) as error:
                    message = " ".join(str(error).split())[:300]
                    raise ConversionError(
                        f"calibration images {tuple(batch.shape)} do not fit the model: "
                        f"{message}"
                    ) from None
                seen += batch.shape[0]
                if seen >= max_images:
                    break
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    if seen == 0:
        raise ConversionError("calibration gave no images")
    missing = [path for path, _ in modules if path not in moments]
    if missing:
        raise ConversionError(f"calibration never reached attention module {missing[0]!r}")
    for path, moment in moments.items():  # groups chosen from NaN would be arbitrary
        if not bool(torch.isfinite(moment.second).all()):
            raise ConversionError(
                f"calibration statistics of {path!r} are not finite: the calibration images "
                "or the model's activations hold NaN or inf (check the normalisation)")
    return moments


# --------------------------------------------------------------------------------------------
# The objective


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
        raise ValueError(f"unknown statistic {statistic!r}; valid: attention, energy")
    terms = _normalised(key)
    if values:
        terms = terms + _normalised(value)
    result: np.ndarray = terms.cpu().numpy()
    return result


# --------------------------------------------------------------------------------------------
# Planning a conversion


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
    layers: Sequence[tuple[str, nn.Module, MHAWeights]],
    num_kv_heads: int,
    calibration: Any,
    *,
    statistic: str,
    equal: bool,
    values: bool,
    max_images: int,
    selection: str = "pooling",
    build: Callable[[str, list[list[int]]], nn.Module] | None = None,
) -> dict[str, GroupPlan]:
    """Measure ``model`` on ``calibration`` and choose every layer's groups.

    ``selection="pooling"``: each layer's least-loss partition. ``"output"``: between that
    and the contiguous partition, whichever leaves the model's final features closer to the
    original on the same images, layer by layer in forward order (``kdgqa.selection``);
    needs ``build(path, groups)``, the converted module of one layer.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; valid: {', '.join(SELECTIONS)}")
    if selection == "output" and build is None:
        raise ValueError("selection='output' needs build(path, groups)")
    images = _first_images(calibration, max_images)  # read once: measured, then re-run
    moments = measure(model, [(path, module) for path, module, _ in layers], images,
                      max_images)
    plans: dict[str, GroupPlan] = {}
    candidates: dict[str, list[list[list[int]]]] = {}
    objectives: dict[str, PoolingObjective] = {}
    for path, _, weights in layers:
        objective = PoolingObjective(pooling_terms(weights, moments[path], statistic, values))
        groups = search_partition(objective, num_kv_heads, equal=equal)
        contiguous = contiguous_groups(weights.num_heads, num_kv_heads)
        plans[path] = GroupPlan(groups, objective.total(groups), objective.total(contiguous))
        objectives[path] = objective
        candidates[path] = [groups] if canonical(groups) == canonical(contiguous) else [
            groups, contiguous]
    if selection == "output":
        assert build is not None
        from kdgqa.selection import select_groups

        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else None
        on_model = [x.to(device=device, dtype=dtype or x.dtype) for x in images]
        picked = select_groups(model, [path for path, _, _ in layers], candidates, on_model,
                               build)
        for path, (groups, errors) in picked.items():
            plans[path] = GroupPlan(groups, objectives[path].total(groups),
                                    plans[path].contiguous_loss, errors)
    return plans


def _first_images(calibration: Any, max_images: int) -> list[Tensor]:
    """The first ``max_images`` calibration images as a list of batches (validated)."""
    batches: list[Tensor] = []
    seen = 0
    for batch in _image_batches(calibration, BATCH_SIZE):
        batches.append(batch[: max_images - seen])
        seen += batches[-1].shape[0]
        if seen >= max_images:
            break
    return batches
