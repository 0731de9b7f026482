"""Hugging Face CLIP image tower: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` and
``CLIPForImageClassification``. Only the vision encoder is converted: the text tower's
attention is causal, and a dual-tower ``CLIPModel`` is refused rather than half-converted."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from kdgqa.errors import ConversionError
from kdgqa.models.hf_common import HFArchitecture

__all__ = ["CLIPArchitecture"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPArchitecture(HFArchitecture):
    """transformers CLIP vision tower; its feature is the pooled, post-normed class token
    (or the projected image embedding)."""

    name = "CLIP vision"
    model_types: ClassVar[tuple[str, ...]] = ("clip_vision_model", "clip")
    classes: ClassVar[tuple[str, ...]] = ("CLIPVisionModel", "CLIPVisionModelWithProjection",
               "CLIPForImageClassification")
    module = "clip"
    attention = "CLIPAttention"
    mean: ClassVar[tuple[float, ...]] = CLIP_MEAN
    std: ClassVar[tuple[float, ...]] = CLIP_STD

    def check_layer(self, path: str) -> None:
        if "text_model" in path.split("."):
            raise ConversionError(f"cannot convert module {path!r}: it is in a text tower "
                                  "(causal attention); convert the vision model alone")

    def pooled(self, output: Any) -> Tensor:
        embeds = getattr(output, "image_embeds", None)
        if embeds is not None:
            return embeds
        pooled: Tensor = output.pooler_output
        return pooled
