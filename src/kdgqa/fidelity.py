"""How close a converted model starts to the MHA model it came from, before any training.

In a transfer study the classifier is new, so accuracy right after conversion is chance level
and says nothing about the conversion. What a conversion keeps or loses is the network's
function on the task the model was trained for; this module measures it there, on labelled
images, by comparing the converted model with its source image by image: both top-1
accuracies, how often their top-1 classes agree, the cosine between their pre-logit features
and the relative error of their logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Fidelity", "Outputs", "compare", "model_outputs"]


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
    forward_features = getattr(model, "forward_features", None)
    forward_head = getattr(model, "forward_head", None)
    if not (callable(forward_features) and callable(forward_head)):
        raise ValueError(f"{type(model).__name__} is not a timm-style model (forward_features "
                        "and forward_head(x, pre_logits=True)); fidelity needs its features")
    features = forward_features(x)
    return forward_head(features, pre_logits=True), forward_head(features)


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
        raise ValueError("no images to measure fidelity on")
    return Outputs(torch.cat(pre), torch.cat(logits), torch.cat(labels))


def compare(reference: Outputs, candidate: Outputs) -> Fidelity:
    """Image-by-image comparison of ``candidate`` with ``reference`` on the same images."""
    if not torch.equal(reference.labels, candidate.labels):
        raise ValueError("reference and candidate outputs are for different images")
    if reference.logits.shape != candidate.logits.shape:
        raise ValueError(f"logits of shape {tuple(candidate.logits.shape)} cannot be compared "
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
