"""Every error kdgqa raises on bad input is a ``kdgqa.KdgqaError`` (and still a ValueError)."""

from __future__ import annotations

import inspect

import pytest
import torch

import kdgqa
from kdgqa import errors


def test_every_error_class_derives_from_the_base():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if c.__module__ == errors.__name__]
    assert len(classes) >= 9
    assert all(issubclass(c, kdgqa.KdgqaError) and issubclass(c, ValueError) for c in classes)
    assert kdgqa.ConversionError is errors.ConversionError


@pytest.mark.parametrize("call", [
    lambda tmp: kdgqa.GroupedQueryAttention(48, 6, 4, "gqa"),
    lambda tmp: kdgqa.build_allocator("gqa2", 6, 3),
    lambda tmp: kdgqa.convert(torch.nn.Linear(2, 2), "gqa", 1),
    lambda tmp: kdgqa.convert(kdgqa.create_timm_vit(img_size=8, patch_size=4, embed_dim=12,
                                                    depth=1, num_heads=2), "nope", 1),
    lambda tmp: kdgqa.load(tmp / "missing"),
    lambda tmp: kdgqa.load_model(str(tmp / "missing.pt")),
    lambda tmp: kdgqa.load_config(None, ["uptrain.lr=-1"]),
    lambda tmp: kdgqa.proportional_counts(torch.ones(3), 2),
], ids=["attention", "scheme", "no-attention", "convert-scheme", "load", "source", "config",
        "apportion"])
def test_bad_input_raises_the_base_class(call, tmp_path):
    with pytest.raises(kdgqa.KdgqaError):
        call(tmp_path)
