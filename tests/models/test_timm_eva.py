"""timm Eva / EVA-02: conversion exact at G = H and against the pooled MHA model at G < H."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.cli import main
from kdgqa.conversion.converter import convert
from kdgqa.errors import ConversionError
from kdgqa.io.checkpoint import load, save_pretrained
from kdgqa.io.export import export_mha
from kdgqa.models import family_of
from kdgqa.models.timm_eva import TimmEva, create_timm_eva
from reference import assert_close_logits, pooled_mha

TINY_EVA = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=6, num_classes=5)
# eva02_tiny: rope ('cat'), SwiGLU MLP, fc_norm; the extras switch on the other layouts.
VARIANTS: dict[str, dict[str, Any]] = {
    "eva02": {},
    "qk-norm+scale-norm": {"qk_norm": True, "scale_attn_inner": True},
    "separate-qkv": {"qkv_fused": False},
    "rope-attention": {"attn_type": "rope"},
    "rope-attention-separate": {"attn_type": "rope", "qkv_fused": False, "qk_norm": True},
    "rotate-half+registers": {"rope_rotate_half": True, "num_reg_tokens": 2},
    "no-bias+post-norm": {"qkv_bias": False, "use_post_norm": True},
}


def _eva(**extra: Any) -> nn.Module:
    torch.manual_seed(0)
    model = create_timm_eva("eva02_tiny_patch14_224", **TINY_EVA, **extra)
    with torch.no_grad():  # timm starts biases, norms and layer scales at 0/1: move them
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_eva_converts_exactly(variant: str, images: Tensor) -> None:
    model = _eva(**VARIANTS[variant])
    assert isinstance(family_of(model), TimmEva)
    with torch.no_grad():
        full = convert(copy.deepcopy(model), "gqa", 6)
        assert_close_logits(full(images), model(images))
        grouped = convert(copy.deepcopy(model), "gqa", 2)
        assert isinstance(grouped.blocks[0].attn, GroupedQueryAttention)
        assert_close_logits(grouped(images), pooled_mha(model, 2)(images))


def test_eva_round_trips_and_exports_mha(tmp_path: Path, images: Tensor) -> None:
    model = convert(_eva(qk_norm=True, scale_attn_inner=True), "gqa", 3)
    save_pretrained(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(again(images), model(images))
    export_mha(model, tmp_path / "mha")
    import timm

    plain = timm.create_model(f"local-dir:{tmp_path / 'mha'}", pretrained=True).eval()
    assert not any(isinstance(m, GroupedQueryAttention) for m in plain.modules())
    with torch.no_grad():
        assert_close_logits(plain(images), model(images))


def test_eva_refuses_what_it_cannot_keep_exact() -> None:
    from timm.models.eva import EvaAttention

    gated = _eva()
    gated.blocks[0].attn = EvaAttention(48, 6, gated=True, scale_norm=False, num_prefix_tokens=1)
    with pytest.raises(ConversionError, match="gated attention"):
        convert(gated, "gqa", 2)
    per_head = _eva(qk_norm=True)
    per_head.blocks[0].attn.k_norm = nn.LayerNorm([6, 1, 8])  # weights per head: refused
    with pytest.raises(ConversionError, match="shared by every head"):
        convert(per_head, "gqa", 2)
    with pytest.raises(ConversionError, match="mixed"):
        convert(_eva(rope_type="mixed"), "gqa", 2)
    with pytest.raises(ConversionError, match="KV heads already"):
        convert(_eva(attn_type="rope", qkv_fused=False, num_kv_heads=3), "gqa", 1)
    calibration = torch.randn(4, 3, 32, 32)
    for kwargs in ({"pooling": "fit"}, {"align": True}):
        with pytest.raises(ConversionError, match="qk-norm"):
            convert(_eva(qk_norm=True), "gqa", 2, calibration=calibration, **kwargs)
    with pytest.raises(ConversionError, match="scale-norm"):
        convert(_eva(scale_attn_inner=True), "calibrated", 2, calibration=calibration)
    with pytest.raises(ConversionError, match="rotary position embedding"):
        convert(_eva(), "gqa", 2, calibration=calibration, align=True)
    torch.manual_seed(0)  # Eva's class defaults (no rope, no norms) take fit and align
    plain = create_timm_eva(**TINY_EVA)
    convert(plain, "gqa", 2, pooling="fit", align=True, calibration=calibration)


def test_cli_converts_a_local_eva_checkpoint(tmp_path: Path, images: Tensor,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = _eva()
    source = tmp_path / "src" / "model.safetensors"
    source.parent.mkdir()
    save_file(model.state_dict(), str(source))
    (source.parent / "config.json").write_text(json.dumps(
        {"architecture": "eva02_tiny_patch14_224", "model_args": TINY_EVA}))
    status = main(["convert", "--model", str(source), "--scheme", "gqa", "--kv-heads", "3",
                   "--out", str(tmp_path / "out")])
    assert status == 0, capsys.readouterr().err
    converted = load(tmp_path / "out")
    assert converted.blocks[1].attn.num_kv_heads == 3
    with torch.no_grad():
        assert_close_logits(converted(images), pooled_mha(model, 3)(images))


def test_distillation_refuses_layers_fed_with_rope() -> None:
    from kdgqa.conversion.distill import distill_layers

    calibration = torch.randn(4, 3, 32, 32)
    original = _eva()
    converted = convert(copy.deepcopy(original), "gqa", 2)
    with pytest.raises(ConversionError, match="'rope'"):
        distill_layers(converted, original, calibration, steps=1, batch_size=2, images=4)
    torch.manual_seed(0)
    plain = create_timm_eva(**TINY_EVA, qk_norm=True)  # no rope: nothing beside the input
    grouped = convert(copy.deepcopy(plain), "gqa", 2)
    reports = distill_layers(grouped, plain, calibration, steps=1, batch_size=2, images=4)
    assert len(reports) == 2
