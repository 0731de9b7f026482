"""Learned fusion: train each grouped layer's shared K/V to reproduce its MHA layer.

The closed forms of :mod:`kdgqa.conversion.fit` price a linearised error (logits and value
contributions); what the layer computes goes through a softmax. This stage, after
conversion, fits the shared K and V projections by gradient descent to the MHA layer's own
outputs on calibration images: layer by layer, each grouped layer is given the inputs its MHA
layer saw in the original model and trained to return that layer's outputs (a relative mean
squared error). Only the K/V rows of the fused projection move; queries and the output
projection stay the MHA model's, so the learned K/V of a group is a learned combination of
what its heads read, DHA's "fusion", initialised from whatever the conversion produced (the
fit, ideally). Layers are trained independently on the original model's activations, so the
order does not matter and one layer's error does not feed the next one's training.

The budget is ``steps`` x ``batch_size`` images per layer; a study that compares it with
uptraining counts it (see ``docs/conversion.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.calibration.measure import first_images
from kdgqa.errors import ConversionError

__all__ = ["DISTILL_BATCH", "DISTILL_IMAGES", "DISTILL_LR", "DISTILL_STEPS",
           "LayerDistillation", "distill_layers"]

#: Defaults: steps per layer, images per step, AdamW learning rate (no weight decay), and
#: calibration images captured.
DISTILL_STEPS = 200
DISTILL_BATCH = 32
DISTILL_LR = 1e-4
DISTILL_IMAGES = 512


@dataclass(frozen=True)
class LayerDistillation:
    """What distillation did to one layer: relative output error before and after."""

    path: str
    error_before: float
    error_after: float


def _output(result: Any) -> Tensor:
    return result[0] if isinstance(result, tuple) else result


def _capture(model: nn.Module, module: nn.Module, batches: Sequence[Tensor], path: str = ""
             ) -> tuple[Tensor, Tensor]:
    """Inputs and outputs of ``module`` while ``model`` runs on ``batches`` (no grad)."""
    seen_in: list[Tensor] = []
    seen_out: list[Tensor] = []

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if not isinstance(x, Tensor):
            raise ConversionError("cannot read the input of an attention layer to distil it")
        side = [name for name, value in kwargs.items()
                if isinstance(value, Tensor) and value is not x] + [
            f"argument {i}" for i, value in enumerate(args[1:], 1) if isinstance(value, Tensor)]
        if side:
            # Rope, window masks, shared position biases: the layer alone would run without
            # them (and random picks of windows would not match a window mask).
            raise ConversionError(f"cannot distil {path or 'this layer'!r}: its attention is "
                                  f"also given {side[0]!r}, which layer-wise distillation "
                                  "does not replay")
        seen_in.append(x.detach())
        seen_out.append(_output(result).detach())

    handle = module.register_forward_hook(hook, with_kwargs=True)
    param = next(model.parameters())
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch.to(device=param.device, dtype=param.dtype))
    finally:
        handle.remove()
    return torch.cat(seen_in), torch.cat(seen_out)


def _relative_error(layer: nn.Module, inputs: Tensor, targets: Tensor, batch: int) -> float:
    error = power = 0.0
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            out = _output(layer(inputs[start:start + batch]))
            target = targets[start:start + batch]
            error += float(((out - target) ** 2).sum())
            power += float((target ** 2).sum())
    return error / power if power > 0 else 0.0


def _grouped_core(layer: nn.Module) -> GroupedQueryAttention:
    core = layer if isinstance(layer, GroupedQueryAttention) else next(
        (m for m in layer.modules() if isinstance(m, GroupedQueryAttention)), None)
    if core is None:
        raise ConversionError(f"{type(layer).__name__} holds no grouped-query attention")
    return core


def distill_layers(
    converted: nn.Module,
    original: nn.Module,
    calibration: Any,
    *,
    steps: int = DISTILL_STEPS,
    batch_size: int = DISTILL_BATCH,
    lr: float = DISTILL_LR,
    images: int = DISTILL_IMAGES,
    seed: int = 0,
) -> list[LayerDistillation]:
    """Train the shared K/V of every converted layer of ``converted`` (in place) to return
    what the same layer of ``original`` (the MHA model it was converted from) returns on its
    inputs from ``calibration`` images. Both models are left in eval mode."""
    conversion = getattr(converted, "kdgqa_conversion", None)
    if conversion is None:
        raise ConversionError("distill_layers needs a model converted by kdgqa.convert")
    if steps < 0 or batch_size < 1 or images < 1 or not lr > 0:
        raise ConversionError(f"distillation needs steps >= 0, batch_size >= 1, images >= 1 "
                              f"and lr > 0; got {steps}, {batch_size}, {images}, {lr}")
    batches = first_images(calibration, images)
    original.eval()
    converted.eval()
    gen = torch.Generator().manual_seed(seed)
    reports = []
    for path in conversion["layers"]:
        layer = converted.get_submodule(path)
        inputs, targets = _capture(original, original.get_submodule(path), batches, path)
        core = _grouped_core(layer)
        query_rows = core.num_heads * core.head_dim
        params = [p for p in (core.qkv.weight, core.qkv.bias) if p is not None]
        frozen = {id(p): p.requires_grad for p in layer.parameters()}
        for each in layer.parameters():
            each.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        before = _relative_error(layer, inputs, targets, batch_size)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        power = float((targets ** 2).mean())
        for _ in range(steps):
            pick = torch.randint(len(inputs), (min(batch_size, len(inputs)),),
                                 generator=gen).to(inputs.device)
            loss = ((_output(layer(inputs[pick])) - targets[pick]) ** 2).mean() / power
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for param in params:  # the queries stay the MHA model's
                assert param.grad is not None
                param.grad[:query_rows] = 0
            optimizer.step()
        for each in layer.parameters():
            each.requires_grad_(frozen[id(each)])
        reports.append(LayerDistillation(path, before,
                                         _relative_error(layer, inputs, targets, batch_size)))
    conversion["distill"] = {"steps": steps, "batch_size": batch_size, "lr": lr,
                             "images": sum(len(b) for b in batches), "seed": seed,
                             "layers": [[r.error_before, r.error_after] for r in reports]}
    return reports
