"""Hugging Face SigLIP image tower: ``SiglipVisionModel`` and ``SiglipForImageClassification``.

Its attention-pooling head (``SiglipMultiheadAttentionPoolingHead``, a ``nn.MultiheadAttention``
read by one learned probe) is left multi-head: the probe is a single query whose keys and
values are computed once per image and never cached, so grouping them saves no cache memory
and would only change the pooled feature. The text tower is refused (see ``hf_clip``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdgqa.models.hf_clip import CLIPArchitecture

__all__ = ["SiglipArchitecture"]


class SiglipArchitecture(CLIPArchitecture):
    """transformers SigLIP vision tower; feature: the pooling head's output, or the mean
    token when the model has no head."""

    name = "SigLIP vision"
    model_types = ("siglip_vision_model", "siglip")
    classes = ("SiglipVisionModel", "SiglipForImageClassification")
    module = "siglip"
    attention = "SiglipAttention"
    mean = (0.5,)
    std = (0.5,)

    def keeps(self, module: nn.Module) -> bool:
        return type(module).__name__ == "SiglipMultiheadAttentionPoolingHead"

    def pooled(self, output: Any) -> Tensor:
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled
        hidden: Tensor = output.last_hidden_state
        return hidden.mean(1)
