"""Hugging Face transformers' ViT: ``ViTModel``, ``ViTForImageClassification``,
``ViTForMaskedImageModeling``.

``ViTAttention`` comes in the nested layout of 4.x and early 5.x
(``attention.{query,key,value}`` + ``output.dense``) or the flat layout of later 5.x
(``q_proj/k_proj/v_proj/o_proj``), read from the installed library, never from version
strings. The replacement returns what the installed ``ViTLayer`` expects: a tuple
``(out,)``/``(out, None)`` (4.40-4.56), a tensor (4.57-5.0x) or ``(out, None)`` (flat layout).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from kdgqa.errors import ConversionError
from kdgqa.models.base import MHAWeights
from kdgqa.models.hf_common import HFArchitecture, HFGroupedAttention, dropout_p

__all__ = ["HF_VIT_CLASSES", "HFViTGroupedAttention", "ViTArchitecture"]

HF_VIT_CLASSES = ("ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling")
#: The grouped replacement of ``ViTAttention`` (the same module serves every HF architecture).
HFViTGroupedAttention = HFGroupedAttention


class ViTArchitecture(HFArchitecture):
    """transformers ViT, in any of its attention layouts."""

    name = "ViT"
    model_types = ("vit",)
    classes = HF_VIT_CLASSES
    module = "vit"
    attention = "ViTAttention"

    def is_attention(self, module: nn.Module) -> bool:
        cls = self.attention_class()
        return cls is not None and isinstance(module, cls) and type(module).__module__ == (
            cls.__module__)

    def layout(self, module: nn.Module) -> str:
        if hasattr(module, "q_proj"):
            return "flat"
        params = inspect.signature(type(module).forward).parameters
        return "legacy-tuple" if "output_attentions" in params else "tensor"

    def projections(self, module: nn.Module) -> tuple[Any, Any, Any, Any]:
        attn: Any = module
        if hasattr(attn, "q_proj"):
            return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        inner = attn.attention
        return inner.query, inner.key, inner.value, attn.output.dense

    def head_dim(self, module: nn.Module) -> int:
        attn: Any = module
        if hasattr(attn, "q_proj"):
            return int(attn.head_dim)
        return int(attn.attention.attention_head_size)

    def dropouts(self, module: nn.Module) -> tuple[float, float]:
        attn: Any = module
        if hasattr(attn, "q_proj"):
            return float(getattr(attn, "attention_dropout", 0.0)), 0.0
        return (dropout_p(getattr(attn.attention, "dropout", None)),
                dropout_p(getattr(attn.output, "dropout", None)))

    def read_attention(self, module: nn.Module, label: str) -> MHAWeights:
        if getattr(module, "pruned_heads", None):
            raise ConversionError(f"cannot convert module {label!r}: it has pruned heads")
        return super().read_attention(module, label)

