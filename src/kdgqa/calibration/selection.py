"""Choosing each layer's groups by what the whole model outputs, not by one layer's loss.

The pooling loss of :mod:`kdgqa.calibration.objective` prices one layer at a time, on the
unconverted model's activations. A partition that loses little in its own layer can still
wreck every layer after it. Measured on the GPU study's ViT-S/4 (Tiny ImageNet 32, G = 2;
converting one layer at a time): in layers 1-9 the least-loss partitions kept more of the
network's function than the contiguous ones, but in layer 0 the least-loss 5 + 1 split cut
the agreement with MHA's predictions from 8.4 % (contiguous 3 + 3) to 2.0 %, and with it the
whole conversion.

So the calibrated conversion also runs the model: layer by layer in forward order, with the
layers before already converted as chosen and the ones after still MHA, it keeps whichever
candidate partition leaves the model's final features closest to the unconverted model's on
the calibration images (relative squared error). Candidates are the least-loss partition and
the contiguous one, so the result is never worse than the paper's grouping on these images,
layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from kdgqa.errors import ConversionError
from kdgqa.models.locate import set_submodule
from kdgqa.models.registry import family_of

__all__ = ["final_features", "select_groups"]

Groups = list[list[int]]


def final_features(model: nn.Module, x: Tensor) -> Tensor:
    """The model's last representation of ``x`` (its pre-logit features), in fp32."""
    family = family_of(model)
    if family is None:
        raise ConversionError(f"cannot read features from a {type(model).__name__}: it "
                              "belongs to no known model family")
    return family.features(model, x).pre_logits.float()


@torch.no_grad()
def select_groups(
    model: nn.Module,
    paths: Sequence[str],
    candidates: Mapping[str, Sequence[Groups]],
    images: Sequence[Tensor],
    build: Callable[[str, Groups], nn.Module],
) -> dict[str, tuple[Groups, list[float]]]:
    """For each attention module in ``paths`` (forward order), the candidate whose conversion
    leaves ``model``'s final features closest to the original ones on ``images``, and the
    relative squared error of every candidate (in the order given).

    ``build(path, groups)`` returns the converted module for one layer. ``model`` is put back
    exactly as it was (modules and training flags) before returning.
    """
    modes = [(m, m.training) for m in model.modules()]
    originals = {path: model.get_submodule(path) for path in paths}
    chosen: dict[str, tuple[Groups, list[float]]] = {}
    try:
        model.eval()
        reference = [final_features(model, x) for x in images]
        energy = sum(float(r.pow(2).sum()) for r in reference)

        def error() -> float:
            diff = sum(float((final_features(model, x) - r).pow(2).sum())
                       for x, r in zip(images, reference, strict=True))
            return diff / energy if energy > 0 else diff

        for path in paths:
            options = list(candidates[path])
            errors: list[float] = []
            if len(options) > 1:  # with one candidate there is nothing to measure
                for groups in options:
                    set_submodule(model, path, build(path, groups).eval())
                    errors.append(error())
            # A non-finite error (NaN features) never wins; ties keep the earlier candidate.
            best = min(range(len(options)), key=lambda i: (
                errors[i] if errors and errors[i] == errors[i] else float("inf")))
            set_submodule(model, path, build(path, options[best]).eval())
            chosen[path] = (options[best], errors)
    finally:
        for path, module in originals.items():
            set_submodule(model, path, module)
        for module, training in modes:
            module.training = training
    return chosen
