"""Hugging Face DINOv2: ``Dinov2Model`` and ``Dinov2ForImageClassification`` (layer scale,
optional SwiGLU MLP, register tokens in ``Dinov2WithRegisters``). Layer scale and the MLP sit
outside the attention, so only the flat-layout attention is replaced."""

from __future__ import annotations

from kdgqa.models.hf_common import IMAGENET_MEAN, IMAGENET_STD, HFArchitecture

__all__ = ["Dinov2Architecture", "Dinov2RegistersArchitecture"]


class Dinov2Architecture(HFArchitecture):
    """transformers DINOv2; the classifier reads the class token and the mean patch token."""

    name = "DINOv2"
    model_types = ("dinov2",)
    classes = ("Dinov2Model", "Dinov2ForImageClassification")
    module = "dinov2"
    attention = "Dinov2Attention"
    mean = IMAGENET_MEAN
    std = IMAGENET_STD


class Dinov2RegistersArchitecture(Dinov2Architecture):
    """transformers DINOv2 with register tokens."""

    name = "DINOv2 with registers"
    model_types = ("dinov2_with_registers",)
    classes = ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification")
    module = "dinov2_with_registers"
    attention = "Dinov2WithRegistersAttention"
