"""Learned fusion: layer-wise distillation of the shared K/V towards the MHA layers."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from conftest import TINY_VIT, tiny_hf_config
from kdgqa.conversion.converter import convert
from kdgqa.conversion.distill import distill_layers
from kdgqa.errors import ConversionError

CALIBRATION = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(**TINY_VIT).eval()  # type: ignore[arg-type]


def _hf() -> torch.nn.Module:
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(tiny_hf_config()).eval()


@pytest.mark.parametrize("build", [_vit, _hf])
def test_distillation_brings_every_layer_closer_and_moves_only_k_and_v(build) -> None:
    original = build()
    converted = convert(copy.deepcopy(original), "gqa", 2)
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    reports = distill_layers(converted, original, CALIBRATION, steps=60, lr=3e-3, images=24)
    assert len(reports) == 2
    assert all(r.error_after < 0.9 * r.error_before for r in reports)
    after = converted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("qkv" in k for k in changed)
    for name in changed:  # the query rows of the fused projection stay the MHA model's
        assert torch.equal(before[name][:48], after[name][:48])
    record = converted.kdgqa_conversion["distill"]
    assert record["steps"] == 60 and record["images"] == 24 and len(record["layers"]) == 2


def test_no_steps_change_nothing_and_bad_settings_are_refused() -> None:
    original = _vit()
    converted = convert(copy.deepcopy(original), "kdgqa", 3)
    before = copy.deepcopy(converted.state_dict())
    distill_layers(converted, original, CALIBRATION, steps=0)
    assert all(torch.equal(before[k], v) for k, v in converted.state_dict().items())
    with pytest.raises(ConversionError, match="needs a model converted"):
        distill_layers(_vit(), original, CALIBRATION)
    with pytest.raises(ConversionError, match="steps >= 0"):
        distill_layers(converted, original, CALIBRATION, lr=0.0)
