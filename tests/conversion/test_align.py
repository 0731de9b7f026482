"""Head alignment: the same function before pooling, rotations that bring heads together."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from conftest import TINY_VIT, tiny_hf_config
from kdgqa.calibration.measure import measure
from kdgqa.conversion.align import align_heads, group_rotations
from kdgqa.conversion.converter import convert
from kdgqa.models.locate import find_attention

CALIBRATION = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
GROUPS = [[0, 1, 2], [3, 4, 5]]


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**TINY_VIT).eval()  # type: ignore[arg-type]


def _hf() -> torch.nn.Module:
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(tiny_hf_config()).eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x) if not hasattr(model, "config") else model(pixel_values=x).logits


def _aligned_mha(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every attention's heads rotated by align_heads, written back as MHA."""
    model = copy.deepcopy(model)
    layers = find_attention(model)
    moments = measure(model, [(la.path, la.module) for la in layers], CALIBRATION, 16)
    for layer in layers:
        turned = align_heads(layer.weights, moments[layer.path], GROUPS)
        layer.family.write_attention(layer.module, turned)
    return model


@pytest.mark.parametrize("build", [_vit, _hf])
def test_alignment_leaves_the_mha_function_unchanged(build, images: torch.Tensor) -> None:
    model = build()
    aligned = _aligned_mha(model)
    assert (_logits(aligned, images) - _logits(model, images)).abs().max() <= 1e-5
    # ... while the weights did change: the rotations are not the identity.
    before = find_attention(model)[0].weights.k_weight
    after = find_attention(aligned)[0].weights.k_weight
    assert (before - after).abs().max() > 1e-3


def test_rotations_are_orthogonal_and_bring_the_heads_together() -> None:
    gen = torch.Generator().manual_seed(4)
    blocks = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64)
    metric = torch.eye(6, dtype=torch.float64)
    turns = group_rotations(blocks, metric, [[0, 1, 2, 3]])
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(turns @ turns.transpose(1, 2), eye.expand(4, 3, 3), atol=1e-12)

    def spread(b: torch.Tensor) -> float:
        return float(((b - b.mean(0)) ** 2).sum())

    assert spread(turns @ blocks) < spread(blocks)


def test_heads_that_differ_by_a_rotation_pool_without_loss(images: torch.Tensor) -> None:
    """Planted: heads 1 and 2 are head 0 in another basis (queries and keys turned alike, and
    values with their output columns), so they compute the same thing; mean pooling mixes
    the bases, aligned pooling recovers head 0 exactly."""
    model = _vit()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in model.blocks:
            qkv, proj = block.attn.qkv, block.attn.proj
            w = qkv.weight.view(3, 6, 8, 48)
            b = qkv.bias.view(3, 6, 8)
            o = proj.weight.view(48, 6, 8)
            for head in (1, 2, 4, 5):
                first = 0 if head < 3 else 3
                turn, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
                other, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
                for part, rot in ((0, turn), (1, turn), (2, other)):
                    w[part, head] = rot @ w[part, first]
                    b[part, head] = rot @ b[part, first]
                o[:, head] = o[:, first] @ other.T
    reference = _logits(model, images)
    mean = _logits(convert(copy.deepcopy(model), "gqa", 2), images)
    aligned = _logits(convert(copy.deepcopy(model), "gqa", 2, calibration=CALIBRATION,
                              align=True), images)
    assert (aligned - reference).abs().max() <= 1e-4
    assert (mean - reference).abs().max() > 100 * (aligned - reference).abs().max()
