"""Model families: everything that differs between timm and Hugging Face models.

``base`` defines the :class:`ModelFamily` interface, ``registry`` knows the families,
``locate`` finds attention layers whatever the family. The built-in families, registered when
this package is imported: ``timm_vit`` (timm ViTs), ``hf_family`` (transformers, one adapter
per architecture: ``hf_vit``, ``hf_deit``, ``hf_dinov2``, ``hf_clip``, ``hf_siglip``,
``hf_beit``), ``timm_eva`` (EVA, EVA-02) and ``timm_relpos`` (BEiT, Swin).
"""

from kdgqa.models.base import Features, InputGeometry, MHAWeights, ModelFamily
from kdgqa.models.hf_family import HFVision
from kdgqa.models.locate import (
    AttentionLayer,
    attention_heads,
    find_attention,
    grouped_layers,
    kv_cache_bytes_per_token,
    read_attention_layer,
    set_submodule,
)
from kdgqa.models.registry import (
    families,
    family_for_library,
    family_of,
    family_of_attention,
    register_model_family,
)
from kdgqa.models.timm_eva import TimmEva
from kdgqa.models.timm_relpos import TimmBeit, TimmSwin
from kdgqa.models.timm_vit import TimmViT

register_model_family(TimmViT())
register_model_family(HFVision())
register_model_family(TimmEva())
register_model_family(TimmBeit())
register_model_family(TimmSwin())

__all__ = [
    "AttentionLayer",
    "Features",
    "InputGeometry",
    "MHAWeights",
    "ModelFamily",
    "attention_heads",
    "families",
    "family_for_library",
    "family_of",
    "family_of_attention",
    "find_attention",
    "grouped_layers",
    "kv_cache_bytes_per_token",
    "read_attention_layer",
    "register_model_family",
    "set_submodule",
]
