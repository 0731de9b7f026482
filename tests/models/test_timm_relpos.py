"""timm BEiT and Swin: per-head relative position bias survives K/V pooling exactly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from kdgqa.conversion.converter import convert
from kdgqa.errors import ConversionError
from kdgqa.io.checkpoint import load, save_pretrained
from kdgqa.io.export import export_mha
from kdgqa.models import family_of
from kdgqa.models.timm_relpos import RelPosGroupedAttention
from kdgqa.models.timm_vit import create_timm_vit
from reference import assert_close_logits, pooled_mha

BEIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=6, num_classes=5)
# 8 x 8 patches, 4 x 4 windows: the second block of stage 1 shifts (masked windows).
SWIN = dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
            num_heads=(4, 4), num_classes=5)
CASES: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "beit": ("beit_base_patch16_224", BEIT, 6, 2),
    "beit-shared-bias": ("beit_base_patch16_224", {**BEIT, "use_rel_pos_bias": False,
                                                   "use_shared_rel_pos_bias": True}, 6, 3),
    "swin": ("swin_tiny_patch4_window7_224", SWIN, 4, 2),
}


def _model(case: str) -> nn.Module:
    name, kwargs, _, _ = CASES[case]
    torch.manual_seed(0)
    model = create_timm_vit(name, **kwargs)
    with torch.no_grad():  # biases and layer scales start at 0 / 0.1: move them
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_relative_bias_models_convert_exactly(case: str, images: Tensor) -> None:
    model = _model(case)
    _, _, heads, groups = CASES[case]
    with torch.no_grad():
        assert_close_logits(convert(copy.deepcopy(model), "gqa", heads)(images), model(images))
        grouped = convert(copy.deepcopy(model), "gqa", groups)
        assert any(isinstance(m, RelPosGroupedAttention) for m in grouped.modules())
        assert_close_logits(grouped(images), pooled_mha(model, groups)(images))


@pytest.mark.parametrize("case", ["beit", "swin"])
def test_relative_bias_models_save_load_and_export(case: str, tmp_path: Path,
                                                   images: Tensor) -> None:
    import timm

    model = convert(_model(case), "gqa", CASES[case][3])
    save_pretrained(model, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "ckpt")(images), model(images))
        export_mha(model, tmp_path / "mha")
        plain = timm.create_model(f"local-dir:{tmp_path / 'mha'}", pretrained=True).eval()
        assert family_of(plain) is family_of(_model(case))
        assert_close_logits(plain(images), model(images))


def test_calibrated_groups_are_refused_on_relative_bias() -> None:
    with pytest.raises(ConversionError, match="relative position bias"):
        convert(_model("beit"), "calibrated", 2, calibration=torch.randn(4, 3, 32, 32))
