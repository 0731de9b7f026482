"""Hugging Face family specifics: BEiT's per-head relative position bias survives pooling,
SigLIP's pooling head stays MHA, DeiT's two heads, unknown directories refused in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import families_matrix as fm
import pytest
import torch

from kdgqa.conversion.converter import convert
from kdgqa.errors import SourceError
from kdgqa.models import family_of
from kdgqa.models.hf_family import HFVision

BEIT = fm.case("BeitForImageClassification (relative position bias)")


def test_beit_bias_is_per_query_head_and_matters() -> None:
    model = BEIT.build()
    x = fm.images(BEIT)
    plain = copy.deepcopy(model)
    for name, param in plain.named_parameters():
        if name.endswith("relative_position_bias_table"):
            assert param.shape[-1] == fm.HEADS  # one bias per query head
            param.data.zero_()
    assert fm.relative_error(fm.output(plain, x), fm.output(model, x)) > 1e-3
    # ... and the converted model still equals the mean-pooled MHA one with the bias on.
    error, _ = fm.check_fewer_heads(BEIT)
    assert error <= fm.RTOL


def test_siglip_pooling_head_is_left_multi_head() -> None:
    model = fm.case("SiglipVisionModel").build()
    path = next(p for p, m in model.named_modules()
                if type(m).__name__ == "SiglipMultiheadAttentionPoolingHead")
    head = copy.deepcopy(model.get_submodule(path))
    convert(model, "gqa", 2)
    assert type(model.get_submodule(path).attention) is torch.nn.MultiheadAttention
    for key, value in head.state_dict().items():
        assert torch.equal(model.get_submodule(path).state_dict()[key], value)


def test_deit_teacher_logits_and_classifier_reset() -> None:
    model = fm.case("DeiTForImageClassificationWithTeacher").build()
    family = family_of(model)
    assert family is not None and family.num_classes(model) == 5
    x = fm.images(fm.case("DeiTModel"))
    with torch.no_grad():
        features = family.features(model, x)
        hidden = model.deit(pixel_values=x).last_hidden_state
    torch.testing.assert_close(features.pre_logits, hidden[:, 0])
    assert features.logits is not None
    torch.testing.assert_close(features.logits, model(pixel_values=x).logits)
    family.reset_classifier(model, 7)
    assert model.cls_classifier.out_features == model.distillation_classifier.out_features == 7
    assert family.num_classes(model) == 7


def test_unsupported_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "swin"}))
    with pytest.raises(SourceError, match="model_type 'swin'") as error:
        HFVision().load_directory(tmp_path, {"model_type": "swin"})
    assert "\n" not in str(error.value)


def test_per_head_bias_follows_permuted_query_heads() -> None:
    """Calibrated schemes permute query heads so groups are contiguous; BEiT's bias, given in
    the original head order, must follow them."""
    import torch.nn.functional as F

    from kdgqa.conversion.converter import build_replacement
    from kdgqa.models import find_attention

    layer = find_attention(BEIT.build())[0]
    groups = [[0, 2], [3, 1]]  # not contiguous: query heads are reordered 0, 2, 3, 1
    new = build_replacement(layer, "calibrated", 2, "mean", {}, groups)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 32, generator=generator)
    bias = torch.randn(1, fm.HEADS, 5, 5, generator=generator)
    w = layer.weights
    d = w.head_dim
    q = F.linear(x, w.q_weight, w.q_bias).view(2, 5, fm.HEADS, d).transpose(1, 2)
    k, v = (F.linear(x, t, b).view(2, 5, fm.HEADS, d).transpose(1, 2)
            for t, b in ((w.k_weight, w.k_bias), (w.v_weight, w.v_bias)))
    for group in groups:  # the MHA layer whose K/V heads are their group's mean
        k[:, group] = k[:, group].mean(1, keepdim=True)
        v[:, group] = v[:, group].mean(1, keepdim=True)
    heads = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    reference = F.linear(heads.transpose(1, 2).reshape(2, 5, -1), w.o_weight, w.o_bias)
    with torch.no_grad():
        out, _ = new(x, attention_mask=bias)
    assert fm.relative_error(out, reference) <= fm.RTOL


def test_dual_tower_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    config = {"model_type": "clip", "architectures": ["CLIPModel"]}
    with pytest.raises(SourceError, match="architecture 'CLIPModel'") as error:
        HFVision().load_directory(tmp_path, config)
    assert "\n" not in str(error.value)
