"""The built-in model families answer the same questions the same way (timm ViT, HF ViT)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_VIT, tiny_hf_config
from kdgqa.models import (
    attention_heads,
    families,
    family_of,
    find_attention,
    kv_cache_bytes_per_token,
)
from kdgqa.models.timm_vit import create_timm_vit


def _timm():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return create_timm_vit(**TINY_VIT)


def _hf():  # type: ignore[no-untyped-def]
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(tiny_hf_config()).eval()


MODELS = {"timm": _timm, "hf": _hf}


def test_both_families_are_registered_once():
    assert [f.library for f in families()] == ["timm", "transformers", "timm-eva", "timm-beit",
                                                "timm-swin"]


@pytest.mark.parametrize("kind", MODELS)
def test_family_reads_geometry_heads_features_and_kv_bytes(kind, images):
    model = MODELS[kind]()
    family = family_of(model)
    assert family is not None and family.library == ("timm" if kind == "timm" else "transformers")
    geometry = family.input_geometry(model)
    assert (geometry.channels, geometry.image_size) == (3, 32)
    assert attention_heads(model) == 6
    assert kv_cache_bytes_per_token(model, torch.float32) == 2 * 2 * 6 * 8 * 4  # 2 layers
    with torch.no_grad():
        features = family.features(model, images)
        logits = model(images)
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    assert features.pre_logits.shape == (2, 48)
    assert features.logits is not None
    torch.testing.assert_close(features.logits, logits)


@pytest.mark.parametrize("kind", MODELS)
def test_written_attention_weights_read_back_unchanged(kind):
    model, other = MODELS[kind](), MODELS[kind]()
    for layer, target in zip(find_attention(model), find_attention(other), strict=True):
        layer.family.write_attention(target.module, layer.weights)
        again = layer.family.read_attention(target.module, target.path)
        for name in ("q_weight", "k_weight", "v_weight", "o_weight", "q_bias", "o_bias"):
            assert torch.equal(getattr(again, name), getattr(layer.weights, name))


@pytest.mark.parametrize("kind", MODELS)
def test_base_records_rebuild_the_same_structure(kind):
    from kdgqa.io.base import base_spec, build_base

    model = MODELS[kind]()
    spec = family_of(model).base_spec(model)  # read from the modules, not remembered
    rebuilt = build_base(spec)
    assert repr(rebuilt) == repr(model)
    assert base_spec(rebuilt) == spec
