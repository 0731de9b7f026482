"""Hugging Face DeiT: ``DeiTModel``, ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher`` (class + distillation tokens, two heads whose
logits are averaged). Attention is ViT's flat layout; nothing else differs for conversion."""

from __future__ import annotations

from kdgqa.models.hf_common import IMAGENET_MEAN, IMAGENET_STD, HFArchitecture

__all__ = ["DeiTArchitecture"]


class DeiTArchitecture(HFArchitecture):
    """transformers DeiT (its pre-logit feature is the class token's, the first head's input)."""

    name = "DeiT"
    model_types = ("deit",)
    classes = ("DeiTModel", "DeiTForImageClassification",
               "DeiTForImageClassificationWithTeacher", "DeiTForMaskedImageModeling")
    module = "deit"
    attention = "DeiTAttention"
    classifiers = ("cls_classifier", "distillation_classifier", "classifier")
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
