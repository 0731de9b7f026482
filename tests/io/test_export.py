"""export_mha(): static grouped models load as plain MHA with timm/transformers alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from conftest import TINY_VIT, tiny_hf_config
from kdgqa.conversion.converter import convert
from kdgqa.errors import ExportError
from kdgqa.io.export import export_mha
from kdgqa.models.timm_vit import create_timm_vit


@pytest.mark.parametrize(("scheme", "groups"), [("gqa", 3), ("mqa", 1), ("gqa", 6)])
def test_timm_export_loads_with_timm_alone(
    tmp_path: Path, images: torch.Tensor, scheme: str, groups: int
) -> None:
    torch.manual_seed(0)
    model = convert(create_timm_vit(**TINY_VIT), scheme, groups).eval()
    export_mha(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    plain = timm.create_model(config["architecture"], pretrained=False,
                              checkpoint_path=str(tmp_path / "model.safetensors"),
                              **config["model_args"]).eval()
    assert type(plain.blocks[0].attn) is timm.layers.Attention
    assert plain.blocks[0].attn.qkv.out_features == 3 * 48
    with torch.no_grad():
        assert (plain(images) - model(images)).abs().max() <= 1e-5
    via_dir = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(via_dir(images), plain(images))


def test_learnt_dgqa_allocation_exports(tmp_path: Path, images: torch.Tensor) -> None:
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = convert(ViTForImageClassification(tiny_hf_config()), "dgqa-ema", 4, window_size=1)
    model.train()
    model(pixel_values=images)
    model.eval()
    counts = model.vit.layers[0].attention.allocator.counts if hasattr(model.vit, "layers") \
        else model.vit.encoder.layer[0].attention.allocator.counts
    assert counts.sum() == 6
    export_mha(model, tmp_path)
    plain = ViTForImageClassification.from_pretrained(str(tmp_path)).eval()
    assert not any("Grouped" in type(m).__name__ for m in plain.modules())
    with torch.no_grad():
        diff = plain(pixel_values=images).logits - model(pixel_values=images).logits
    assert diff.abs().max() <= 1e-5


@pytest.mark.parametrize(("scheme", "options"), [("kdgqa", {}), ("dgqa-ema", {"reference": True}),
                                                 ("pgqa", {"reference": True})])
def test_dynamic_allocations_refused(tmp_path: Path, scheme: str, options: dict) -> None:
    model = convert(create_timm_vit(**TINY_VIT), scheme, 3, **options)
    with pytest.raises(ExportError, match="cannot export"):
        export_mha(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unconverted_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no GroupedQueryAttention"):
        export_mha(nn.Linear(2, 2), tmp_path)
