"""Choosing a layer's groups by the model's final features (``selection="output"``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import TINY_VIT
from kdgqa import convert
from kdgqa.calibration.partition import contiguous_groups
from kdgqa.calibration.selection import final_features, select_groups
from kdgqa.conversion.converter import build_replacement
from kdgqa.models.locate import read_attention_layer
from kdgqa.models.timm_vit import create_timm_vit

HEADS = TINY_VIT["num_heads"]


def _model(depth: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return create_timm_vit(**{**TINY_VIT, "depth": depth}).eval()


def _images(count: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = final_features(reference, x)
        return float((final_features(model, x) - ref).pow(2).sum() / ref.pow(2).sum())


def _with_layer(model: nn.Module, index: int, groups: list[list[int]], kv: int) -> nn.Module:
    hybrid = copy.deepcopy(model)
    attn = hybrid.blocks[index].attn
    hybrid.blocks[index].attn = build_replacement(read_attention_layer(attn), "calibrated",
                                                   kv, "mean", {}, groups)
    return hybrid


@pytest.mark.parametrize("kv", [2, 3])
def test_each_layer_keeps_the_candidate_closest_to_the_original_output(kv: int) -> None:
    model = _model()
    x = _images()
    by_loss = convert(copy.deepcopy(model), "calibrated", kv, calibration=x,
                      selection="pooling")
    chosen = convert(copy.deepcopy(model), "calibrated", kv, calibration=x)
    record = chosen.kdgqa_conversion["calibration"]
    contiguous = contiguous_groups(HEADS, kv)
    kept = 0
    for index, block in enumerate(chosen.blocks):
        least_loss = by_loss.blocks[index].attn.allocator.groups()
        groups = block.attn.allocator.groups()
        errors = record[f"blocks.{index}.attn"]["candidate_errors"]
        assert groups in (least_loss, contiguous)
        if least_loss == contiguous:
            assert errors == []
        else:
            assert len(errors) == 2 and groups == [least_loss, contiguous][errors.index(min(errors))]
            kept += groups == least_loss
    assert kept >= 1  # not a roundabout way back to the contiguous groups
    # Layer 0 checked independently: convert it alone either way, compare the outputs.
    least_loss = by_loss.blocks[0].attn.allocator.groups()
    if least_loss != contiguous:
        errors = [_error(_with_layer(model, 0, g, kv), model, x) for g in (least_loss, contiguous)]
        expected = [least_loss, contiguous][errors.index(min(errors))]
        assert chosen.blocks[0].attn.allocator.groups() == expected
        assert record["blocks.0.attn"]["candidate_errors"] == pytest.approx(errors, rel=1e-4)


def test_the_output_can_overrule_the_pooling_loss() -> None:
    """Planted in layer 0: head 3's keys copy head 0's and heads 1 and 2 have tiny keys, so
    the least-loss groups pair 0 with 3; on the model's output the contiguous split loses
    less, and it is the one kept."""
    model = _model(depth=2)
    width = HEADS * 8
    with torch.no_grad():
        keys = model.blocks[0].attn.qkv.weight[width:2 * width].view(HEADS, 8, -1)
        keys[3] = keys[0]
        keys[1] *= 0.01
        keys[2] *= 0.01
    x = _images()
    contiguous = contiguous_groups(HEADS, 2)
    least_loss = convert(copy.deepcopy(model), "calibrated", 2, calibration=x,
                         selection="pooling").blocks[0].attn.allocator.groups()
    assert least_loss != contiguous and [0, 3] in least_loss
    chosen = convert(copy.deepcopy(model), "calibrated", 2, calibration=x)
    errors = chosen.kdgqa_conversion["calibration"]["blocks.0.attn"]["candidate_errors"]
    assert errors[1] < errors[0] and chosen.blocks[0].attn.allocator.groups() == contiguous


def test_selection_leaves_the_model_as_it_was() -> None:
    model = _model(depth=2).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [model.blocks[i].attn for i in range(2)]
    paths = ["blocks.0.attn", "blocks.1.attn"]
    candidates = {p: [[[0, 1, 2], [3, 4, 5]], [[0, 2, 4], [1, 3, 5]]] for p in paths}
    originals = dict(zip(paths, modules, strict=True))

    def build(path: str, groups: list[list[int]]) -> nn.Module:
        attn = originals[path]
        return build_replacement(read_attention_layer(attn), "calibrated", 2, "mean", {},
                                  groups)

    picked = select_groups(model, paths, candidates, [_images(8)], build)
    assert set(picked) == set(paths) and all(len(e) == 2 for _, e in picked.values())
    assert [model.blocks[i].attn for i in range(2)] == modules and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unknown selection"):
        convert(copy.deepcopy(model), "calibrated", 2, calibration=_images(), selection="best")


def test_a_candidate_whose_output_is_not_finite_never_wins() -> None:
    model = _model(depth=1)
    path = "blocks.0.attn"
    good, bad = [[0, 1, 2], [3, 4, 5]], [[0, 2, 4], [1, 3, 5]]
    original = model.get_submodule(path)

    def build(p: str, groups: list[list[int]]) -> nn.Module:
        attn = original
        new = build_replacement(read_attention_layer(attn), "calibrated", 2, "mean", {},
                                 groups)
        if groups == bad:
            with torch.no_grad():
                new.proj.weight.fill_(float("nan"))
        return new

    picked = select_groups(model, [path], {path: [bad, good]}, [_images(4)], build)
    groups, errors = picked[path]
    assert groups == good and errors[0] != errors[0]  # NaN measured, not chosen
