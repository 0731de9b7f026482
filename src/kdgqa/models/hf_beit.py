"""Hugging Face BEiT: ``BeitModel`` and ``BeitForImageClassification``.

BEiT adds a relative position bias to the attention logits of each query head; transformers
5.x hands it to the attention as ``attention_mask`` of shape ``(1, H, N, N)``. The grouped
replacement passes it to SDPA as it is, still one bias per *query* head, so pooling K/V
leaves it untouched and G = H stays exact. Its key projection has no bias, which is the same
as a zero bias (pooled: still zero; written back: skipped).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdgqa.models.hf_common import HFArchitecture

__all__ = ["BeitArchitecture"]


class BeitArchitecture(HFArchitecture):
    """transformers BEiT; feature: the pooler's output (mean patch token, normed) if any."""

    name = "BEiT"
    model_types = ("beit",)
    classes = ("BeitModel", "BeitForImageClassification", "BeitForMaskedImageModeling")
    module = "beit"
    attention = "BeitAttention"

    def pooled(self, output: Any) -> Tensor:
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled
        hidden: Tensor = output.last_hidden_state
        return hidden[:, 0]
