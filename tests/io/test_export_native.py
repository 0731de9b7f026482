"""export_native(): uniform conversions load in stock timm, without kdgqa, with fewer K/V."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import TINY_VIT
from kdgqa.attention import GroupedQueryAttention
from kdgqa.cli import main
from kdgqa.conversion.converter import convert
from kdgqa.errors import ExportError
from kdgqa.io.export_native import export_native, native_gqa_available, uniform_kv_heads
from kdgqa.models.timm_eva import create_timm_eva
from kdgqa.models.timm_vit import create_timm_vit

pytestmark = pytest.mark.skipif(not native_gqa_available(),
                                reason="the installed timm's Eva takes no num_kv_heads")

TINY_EVA = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=6, num_classes=5)

# Loads every export with timm alone and writes its logits and K/V shapes; kdgqa must stay out.
_LOADER = textwrap.dedent("""
    import json, sys
    import timm, torch
    from safetensors.torch import load_file, save_file
    root = sys.argv[1]
    images = load_file(root + "/images.safetensors")["images"]
    out, shapes = {}, {}
    for name in sys.argv[2:]:
        model = timm.create_model("local-dir:" + root + "/" + name, pretrained=True).eval()
        with torch.no_grad():
            out[name] = model(images).contiguous()
        attn = model.blocks[0].attn
        shapes[name] = [type(attn).__name__, list(attn.k_proj.weight.shape),
                        list(attn.v_proj.weight.shape)]
    assert "kdgqa" not in sys.modules, "the loader imported kdgqa"
    save_file(out, root + "/logits.safetensors")
    print(json.dumps(shapes))
""")


def _moved(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # timm starts biases, norms and layer scales at 0/1: move them
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _models() -> dict[str, tuple[nn.Module, int]]:
    torch.manual_seed(0)
    return {
        "eva02": (convert(_moved(create_timm_eva("eva02_tiny_patch14_224", **TINY_EVA,
                                                 qk_norm=True, scale_attn_inner=True)),
                          "gqa", 2), 2),
        "eva-class": (convert(_moved(create_timm_eva(**TINY_EVA, qkv_fused=False)),
                              "mqa", 1), 1),
        "vit": (convert(_moved(create_timm_vit(**TINY_VIT, init_values=0.5, reg_tokens=2)),
                        "gqa", 3), 3),
        "vit-avg-nobias": (convert(_moved(create_timm_vit(
            **TINY_VIT, class_token=False, global_pool="avg", proj_bias=False, pre_norm=True)),
            "gqa", 2), 2),
    }


def test_native_export_runs_in_timm_alone(tmp_path: Path, images: torch.Tensor) -> None:
    models = _models()
    for name, (model, _) in models.items():
        export_native(model, tmp_path / name)
    save_file({"images": images}, str(tmp_path / "images.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _LOADER, str(tmp_path), *models], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    shapes = json.loads(done.stdout.strip().splitlines()[-1])
    logits = load_file(str(tmp_path / "logits.safetensors"))
    for name, (model, kv_heads) in models.items():
        assert shapes[name] == ["AttentionRope", [kv_heads * 8, 48], [kv_heads * 8, 48]]
        with torch.no_grad():
            want = model(images)
        # fp32; the same arithmetic with the projections split differently: 1e-5 relative.
        assert (logits[name] - want).abs().max() <= 1e-5 * want.abs().max(), name


def _static(groups: list[int]) -> nn.Module:
    model = convert(create_timm_vit(**TINY_VIT), "gqa", 3)
    for module in model.modules():
        if isinstance(module, GroupedQueryAttention):
            calibrated = GroupedQueryAttention(48, 6, 3, "calibrated")
            calibrated.allocator.set_groups(groups, list(range(6)))
            module.allocator = calibrated.allocator
    return model


@pytest.mark.parametrize(("make", "match"), [
    (lambda: convert(create_timm_vit(**TINY_VIT), "kdgqa", 3), "cannot export"),
    (lambda: _static([1, 2, 3]), "uneven or reordered"),
    (lambda: convert(create_timm_vit(**TINY_VIT, act_layer="quick_gelu"), "gqa", 3),
     "exact GELU"),
    (lambda: convert(create_timm_vit("deit_tiny_distilled_patch16_224", **TINY_VIT), "gqa", 3),
     "subclass may add tokens"),
    (lambda: convert(create_timm_eva(**TINY_EVA, use_post_norm=True), "gqa", 3), "post-norm"),
    (lambda: convert(create_timm_vit("beit_base_patch16_224", **TINY_VIT), "gqa", 3),
     "only timm Eva and timm VisionTransformer"),
])
def test_native_export_refuses_with_the_reason(tmp_path: Path, make: Any, match: str) -> None:
    with pytest.raises(ExportError, match=match):
        export_native(make(), tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_uniform_map_after_a_permutation_is_native() -> None:
    module = GroupedQueryAttention(48, 6, 3, "calibrated")
    module.allocator.set_groups([2, 2, 2], [1, 0, 2, 3, 5, 4])  # heads permuted, equal groups
    assert uniform_kv_heads(module) == 3


def test_cli_writes_a_native_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    source = tmp_path / "src" / "model.safetensors"
    source.parent.mkdir()
    save_file(create_timm_eva("eva02_tiny_patch14_224", **TINY_EVA).state_dict(), str(source))
    (source.parent / "config.json").write_text(json.dumps(
        {"architecture": "eva02_tiny_patch14_224", "model_args": TINY_EVA}))
    status = main(["convert", "--model", str(source), "--scheme", "gqa", "--kv-heads", "2",
                   "--out", str(tmp_path / "out"), "--format", "native"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "native timm GQA model" in out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_args"]["num_kv_heads"] == 2
    assert config["model_args"]["attn_type"] == "rope"
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert tensors["blocks.0.attn.k_proj.weight"].shape == (16, 48)
