"""How close a converted model starts to the MHA model it came from, before any training.

In a transfer study the classifier is new, so accuracy right after conversion is chance level
and says nothing about the conversion. What a conversion keeps or loses is the network's
function on the task the model was trained for; this module measures it there, on labelled
images, by comparing the converted model with its source image by image: both top-1
accuracies, how often their top-1 classes agree, the cosine between their pre-logit features
and the relative error of their logits.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdgqa.errors import ConfigError
from kdgqa.io.sources import load_model
from kdgqa.models.locate import attention_heads, grouped_layers, set_submodule
from kdgqa.models.registry import family_of
from kdgqa.study.calibration_images import convert_grid_cell, dataset_config
from kdgqa.study.config import ExperimentConfig, resolve_scheme
from kdgqa.study.data import Batches, check_dataset, load_splits
from kdgqa.study.distributed import resolve_device

__all__ = ["Fidelity", "Outputs", "compare", "grid_fidelity", "model_outputs", "per_layer_models"]


@dataclass(frozen=True)
class Outputs:
    """What a model produced on a fixed set of labelled images, in image order (CPU, fp32)."""

    pre_logits: Tensor
    logits: Tensor
    labels: Tensor


@dataclass(frozen=True)
class Fidelity:
    """A candidate model against its reference on the same images."""

    images: int
    top1: float
    reference_top1: float
    agreement: float
    feature_cosine: float
    logit_relative_error: float


def _pre_logits_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    family = family_of(model)
    features = family.features(model, x) if family is not None else None
    if features is None or features.logits is None:
        raise ConfigError(f"{type(model).__name__} has no classifier kdgqa can read (an "
                          "image classifier of a family in docs/families.md); fidelity needs "
                          "its features and logits")
    return features.pre_logits, features.logits


@torch.no_grad()
def model_outputs(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                  amp: bool = True) -> Outputs:
    """Run ``model`` in evaluation mode over ``batches`` of ``(images, labels)``.

    ``amp``: bf16 autocast on CUDA (as the study trains and evaluates); fp32 elsewhere.
    """
    was_training = model.training
    model.eval()
    pre, logits, labels = [], [], []
    try:
        for x, y in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16,
                                enabled=amp and x.device.type == "cuda"):
                p, z = _pre_logits_and_logits(model, x)
            pre.append(p.float().cpu())
            logits.append(z.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not labels:
        raise ConfigError("no images to measure fidelity on")
    return Outputs(torch.cat(pre), torch.cat(logits), torch.cat(labels))


def compare(reference: Outputs, candidate: Outputs) -> Fidelity:
    """Image-by-image comparison of ``candidate`` with ``reference`` on the same images."""
    if not torch.equal(reference.labels, candidate.labels):
        raise ConfigError("reference and candidate outputs are for different images")
    if reference.logits.shape != candidate.logits.shape:
        raise ConfigError(f"logits of shape {tuple(candidate.logits.shape)} cannot be compared "
                         f"with {tuple(reference.logits.shape)}")
    ref_top = reference.logits.argmax(-1)
    cand_top = candidate.logits.argmax(-1)
    error = (candidate.logits - reference.logits).norm() / reference.logits.norm().clamp_min(
        torch.finfo(torch.float32).tiny)
    return Fidelity(
        images=int(reference.labels.numel()),
        top1=float((cand_top == candidate.labels).float().mean()),
        reference_top1=float((ref_top == reference.labels).float().mean()),
        agreement=float((cand_top == ref_top).float().mean()),
        feature_cosine=float(F.cosine_similarity(candidate.pre_logits, reference.pre_logits,
                                                 dim=-1).mean()),
        logit_relative_error=float(error),
    )


def per_layer_models(base: nn.Module, converted: nn.Module) -> Iterable[tuple[int, str, nn.Module]]:
    """``(index, path, hybrid)`` for each converted attention layer of ``converted``: a copy of
    the MHA model ``base`` in which only that layer is the converted one. Comparing each hybrid
    with ``base`` says which layer's conversion costs the model most (in the first study, layer
    0 alone lost most of it)."""
    for index, (path, layer) in enumerate(grouped_layers(converted)):
        hybrid = copy.deepcopy(base)
        set_submodule(hybrid, path, copy.deepcopy(layer))
        yield index, path, hybrid


def grid_fidelity(
    config: ExperimentConfig,
    data: str,
    *,
    images: int = 2000,
    batch_size: int = 256,
    device: str = "auto",
    per_layer: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], int, str]:
    """Convert every cell of ``config``'s grid from ``model.pretrained`` exactly as
    ``kdgqa experiment`` does (calibrated schemes on the first images of the study's own
    training split) and compare each with the MHA model on a seeded sample of ``images``
    test images of ``data`` (``NAME:ROOT`` or an image folder of the model's own task).

    With ``per_layer``, each converted cell also gets one row per attention layer (``layer``,
    ``path``) for the model in which only that layer is converted (:func:`per_layer_models`).
    Returns one row per cell (MHA first), the number of images compared and the device.
    No training.
    """
    if images < 1 or batch_size < 1:
        raise ConfigError(f"images and batch_size must be >= 1, got {images} and {batch_size}")
    if not config.model.pretrained:
        raise ConfigError("fidelity needs model.pretrained (the MHA model the grid converts)")
    dev = resolve_device(device)
    size = config.data.image_size
    data_cfg = dataset_config(data, size, math.ceil(images / 0.2), what="--data")
    check_dataset(data_cfg)
    base = load_model(config.model.pretrained).float().to(dev).eval()
    heads = attention_heads(base)
    splits = load_splits(data_cfg)
    classes = int(getattr(base, "num_classes", -1))
    if classes != splits.num_classes:
        raise ConfigError(f"the model has {classes} classes but {data} has "
                          f"{splits.num_classes}; fidelity needs the data of the model's own "
                          "task (its classifier's classes)")
    test = splits.test
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:images]
    test = test.subset(pick.sort().values).to(dev)
    batches = Batches(test, batch_size, image_size=size, mean=config.data.mean,
                      std=config.data.std, shuffle=False, drop_last=False)
    reference = model_outputs(base, batches.epoch(0))

    cells: list[tuple[str, str, dict[str, Any], int]] = [("mha", "mha", {}, heads)]
    for kv in config.grid.kv_heads:
        cells += [(label, *resolve_scheme(config.grid, label), kv)
                  for label in config.grid.schemes]
    cache: dict[str, Any] = {}

    def study_train() -> Any:  # the study's own calibration images, read once if needed
        if "train" not in cache:
            cache["train"] = load_splits(config.data, seed=config.seed).train
        return cache["train"]

    rows = []
    for label, scheme, options, kv in cells:
        model = copy.deepcopy(base)
        if scheme != "mha":
            convert_grid_cell(model, base, config.grid, label, kv, study_train, config.data,
                              config.seed)
        model.to(dev)
        torch.manual_seed(config.seed)  # schemes with evaluation-time noise draw the same
        fid = compare(reference, model_outputs(model, batches.epoch(0)))
        rows.append({"scheme": label, "base_scheme": scheme, "scheme_options": options,
                     "kv_heads": kv, "num_heads": heads, **vars(fid)})
        if log is not None:
            log(f"{label} G={kv}: top-1 {100 * fid.top1:.2f} %, agrees with MHA "
                f"{100 * fid.agreement:.2f} %, feature cosine {fid.feature_cosine:.4f}")
        if not per_layer or scheme == "mha":
            continue
        for index, path, hybrid in per_layer_models(base, model):
            torch.manual_seed(config.seed)
            fid = compare(reference, model_outputs(hybrid.to(dev), batches.epoch(0)))
            rows.append({"scheme": label, "base_scheme": scheme, "scheme_options": options,
                         "kv_heads": kv, "num_heads": heads, "layer": index, "path": path,
                         **vars(fid)})
            if log is not None:
                log(f"  {label} G={kv} only layer {index} ({path}): agrees with MHA "
                    f"{100 * fid.agreement:.2f} %, feature cosine {fid.feature_cosine:.4f}")
    return rows, len(pick), str(dev)
