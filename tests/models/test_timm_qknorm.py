"""qk-norm ViTs: the per-head norm is shared by all heads, so pooled keys reuse it; what
cannot reason about the norm (align, fitted pooling) is refused; MHA export writes the
trained norms back."""

from __future__ import annotations

import copy

import families_matrix as fm
import pytest
import torch
from torch import nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.conversion.converter import convert
from kdgqa.errors import ConversionError
from kdgqa.models.timm_vit import shared_head_norm

QK = fm.case("qk-norm ViT (qk_norm=True)")


def test_timm_qk_norm_is_one_norm_over_head_dim_shared_by_heads() -> None:
    attn = QK.build().blocks[0].attn
    assert tuple(attn.k_norm.weight.shape) == (attn.head_dim,)  # one weight for every head
    assert shared_head_norm(attn.k_norm, attn.head_dim)
    assert not shared_head_norm(nn.LayerNorm(attn.head_dim * attn.num_heads), attn.head_dim)
    assert not shared_head_norm(nn.Identity(), attn.head_dim)


def test_converted_layer_keeps_the_trained_norms() -> None:
    model = QK.build()
    norms = copy.deepcopy(model.blocks[0].attn.k_norm.state_dict())
    convert(model, "gqa", 2)
    attn = model.blocks[0].attn
    assert isinstance(attn, GroupedQueryAttention) and attn.k_norm is not None
    for key, value in norms.items():
        assert torch.equal(attn.k_norm.state_dict()[key], value)


def test_norm_over_other_axes_is_refused_before_changing_anything() -> None:
    model = QK.build()
    model.blocks[1].attn.k_norm = nn.LayerNorm(32)  # over all heads: no per-head norm
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn.*head_dim"):
        convert(model, "gqa", 2)
    assert not any(isinstance(m, GroupedQueryAttention) for m in model.modules())


@pytest.mark.parametrize("options", [{"align": True}, {"pooling": "fit"}])
def test_align_and_fitted_pooling_are_refused(options: dict) -> None:
    model = QK.build()
    with pytest.raises(ConversionError, match="qk-norm"):
        convert(model, "gqa", 2, calibration=fm.images(QK, 4), **options)
    assert not any(isinstance(m, GroupedQueryAttention) for m in model.modules())


def test_mha_export_writes_the_trained_norms_back(tmp_path) -> None:
    import kdgqa
    from kdgqa.io.sources import load_model

    model = QK.build().eval()
    convert(model, "gqa", 4)  # G = H: the export must be the very same function
    with torch.no_grad():  # trained norms: no longer the ones the rebuilt base starts with
        for block in model.blocks:
            block.attn.k_norm.weight.mul_(1.5)
            block.attn.q_norm.bias.add_(0.1)
    kdgqa.export_mha(model, tmp_path / "mha")
    plain = load_model(str(tmp_path / "mha")).eval()
    x = fm.images(QK, 2)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), rtol=1e-5, atol=1e-6)
