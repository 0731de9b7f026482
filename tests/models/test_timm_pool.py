"""timm's attention-pooling head: kept multi-head by default, grouped on request, exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import families_matrix as fm
import pytest
import torch

from kdgqa.conversion.converter import convert
from kdgqa.errors import ConversionError
from kdgqa.models.timm_pool import GroupedAttentionPoolLatent

SIGLIP = fm.case("SigLIP image tower (global_pool='map')")


def _pooled_reference(groups: int) -> torch.nn.Module:
    """The MHA model with every K/V head, the pooling head's included, replaced by the mean
    of its contiguous group (independent of the code under test)."""
    model = fm.mean_pooled_mha(SIGLIP.build(), groups)
    kv = model.attn_pool.kv
    heads, dim = model.attn_pool.num_heads, model.attn_pool.head_dim
    with torch.no_grad():
        for t in (kv.weight, kv.bias):
            per_head = t.view(2, heads, dim, -1)
            for g in range(groups):
                members = slice(g * heads // groups, (g + 1) * heads // groups)
                per_head[:, members] = per_head[:, members].mean(1, keepdim=True)
    return model


def test_the_head_stays_multi_head_by_default() -> None:
    model = convert(SIGLIP.build(), "gqa", fm.FEWER)
    assert type(model.attn_pool).__name__ == "AttentionPoolLatent"
    assert model.kdgqa_conversion["attention_pool"] == "keep"


def test_grouped_head_is_exact_at_g_equal_h_and_mean_pooled_below() -> None:
    x = fm.images(SIGLIP)
    same = convert(SIGLIP.build(), "gqa", fm.HEADS, attention_pool="gqa")
    assert isinstance(same.attn_pool, GroupedAttentionPoolLatent)
    assert fm.relative_error(fm.output(same, x), fm.output(SIGLIP.build(), x)) <= fm.RTOL
    fewer = convert(SIGLIP.build(), "gqa", fm.FEWER, attention_pool="gqa")
    assert fewer.attn_pool.kv.out_features == 2 * fm.FEWER * fewer.attn_pool.head_dim
    reference = fm.output(_pooled_reference(fm.FEWER), x)
    assert fm.relative_error(fm.output(fewer, x), reference) <= fm.RTOL
    kept = convert(SIGLIP.build(), "gqa", fm.FEWER)  # the pooling head's grouping matters
    assert fm.relative_error(fm.output(kept, x), reference) > 100 * fm.RTOL


def test_save_load_and_mha_export_keep_the_function(tmp_path: Path) -> None:
    import kdgqa
    from kdgqa.io.sources import load_model

    x = fm.images(SIGLIP)
    model = convert(SIGLIP.build(), "gqa", fm.FEWER, attention_pool="gqa")
    kdgqa.save_pretrained(model, tmp_path / "saved")
    again = kdgqa.load(tmp_path / "saved")
    assert isinstance(again.attn_pool, GroupedAttentionPoolLatent)
    assert torch.equal(fm.output(again, x), fm.output(model, x))
    kdgqa.export_mha(model, tmp_path / "mha")
    plain = load_model(str(tmp_path / "mha"))
    assert type(plain.attn_pool).__name__ == "AttentionPoolLatent"
    assert fm.relative_error(fm.output(plain, x), fm.output(model, x)) <= fm.RTOL


def test_refusals_are_one_line_and_change_nothing() -> None:
    vit = fm.case("ViT").build()
    before = copy.deepcopy(vit.state_dict())
    with pytest.raises(ConversionError, match="no timm AttentionPoolLatent"):
        convert(vit, "gqa", fm.FEWER, attention_pool="gqa")
    with pytest.raises(ConversionError, match="attention_pool must be one of keep, gqa"):
        convert(vit, "gqa", fm.FEWER, attention_pool="yes")
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())
    siglip = SIGLIP.build()
    with pytest.raises(ConversionError, match="must divide"):
        convert(siglip, "kdgqa", 3, attention_pool="gqa")  # uneven groups: fine for blocks
    assert type(siglip.attn_pool).__name__ == "AttentionPoolLatent"
    assert not any(isinstance(m, GroupedAttentionPoolLatent) for m in siglip.modules())


def test_cli_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import kdgqa
    from kdgqa.cli import main

    kdgqa.save_pretrained(SIGLIP.build(), tmp_path / "source")
    status = main(["convert", "--model", str(tmp_path / "source"), "--scheme", "gqa",
                   "--kv-heads", str(fm.FEWER), "--attention-pool", "gqa",
                   "--out", str(tmp_path / "out")])
    assert status == 0, capsys.readouterr().err
    assert isinstance(kdgqa.load(tmp_path / "out").attn_pool, GroupedAttentionPoolLatent)
