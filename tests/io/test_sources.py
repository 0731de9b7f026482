"""load_model(): every source kind goes through the real loaders on locally made files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_VIT, tiny_hf_config
from kdgqa.conversion.converter import convert
from kdgqa.errors import SourceError
from kdgqa.io.checkpoint import save_pretrained
from kdgqa.io.sources import load_model
from kdgqa.io.weights import read_state_dict
from kdgqa.models.timm_vit import create_timm_vit

ARGS = {"arch": "vit_tiny_patch16_224", "model_kwargs": {**TINY_VIT}}


def _same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_create_timm_vit_remembers_kwargs() -> None:
    model = create_timm_vit(**TINY_VIT, reg_tokens=2)
    assert model.kdgqa_base["kwargs"]["reg_tokens"] == 2
    assert model.num_prefix_tokens == 3


def test_safetensors_file_with_arch(tmp_path: Path, images: torch.Tensor) -> None:
    model = create_timm_vit(**TINY_VIT)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_model(str(tmp_path / "w.safetensors"), **ARGS)
    assert _same(model, loaded, images)
    assert loaded.kdgqa_base["name"] == "vit_tiny_patch16_224"


def test_pth_file_with_sidecar_config(tmp_path: Path, images: torch.Tensor) -> None:
    model = create_timm_vit(**TINY_VIT)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "w.pth")
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "model_args": TINY_VIT}))
    assert _same(model, load_model(str(tmp_path / "w.pth")), images)


class Evil:
    """Any user class: unpickling it would run arbitrary code."""


def test_pickle_with_objects_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1), "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(SourceError, match="refusing"):
        read_state_dict(tmp_path / "evil.pth")


def test_wrong_shapes_and_missing_architecture(tmp_path: Path) -> None:
    model = create_timm_vit(**{**TINY_VIT, "embed_dim": 24, "num_heads": 3})
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(SourceError, match="do not fit"):
        load_model(str(tmp_path / "w.safetensors"), **ARGS)
    with pytest.raises(SourceError, match="architecture"):
        load_model(str(tmp_path / "w.safetensors"))


def test_hf_directory(tmp_path: Path, images: torch.Tensor) -> None:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification(tiny_hf_config()).eval()
    model.save_pretrained(str(tmp_path))
    loaded = load_model(str(tmp_path))
    assert type(loaded) is ViTForImageClassification
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=images).logits, model(pixel_values=images).logits)


def test_kdgqa_directory(tmp_path: Path, images: torch.Tensor) -> None:
    model = convert(create_timm_vit(**TINY_VIT), "gqa", 2)
    save_pretrained(model, tmp_path)
    assert _same(model, load_model(str(tmp_path)), images)


@pytest.mark.parametrize(
    ("source", "match"),
    [("timm:not_a_model_xyz", "unknown timm model"), ("missing.safetensors", "does not exist"),
     ("nowhere/at/all", "unknown model"), ("", "non-empty")],
)
def test_bad_sources(source: str, match: str) -> None:
    with pytest.raises(SourceError, match=match):
        load_model(source)


def test_unsupported_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SourceError, match="unsupported model file"):
        load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(SourceError, match="neither"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SourceError, match="unsupported Hugging Face"):
        load_model(str(tmp_path))


def test_an_offline_timm_name_fails_at_once_without_cached_weights(monkeypatch) -> None:
    import time

    from kdgqa.errors import SourceError
    from kdgqa.io.sources import load_model
    from kdgqa.models import timm_vit

    monkeypatch.setattr(timm_vit, "_reachable", lambda host: False)
    monkeypatch.setattr(timm_vit, "_cached_weights", lambda name: None)
    start = time.monotonic()
    with pytest.raises(SourceError, match="not in the local Hugging Face cache"):
        load_model("timm:vit_tiny_patch16_224")
    assert time.monotonic() - start < 10


def test_an_offline_timm_name_loads_cached_weights(monkeypatch, tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    from kdgqa.io.sources import load_model
    from kdgqa.models import timm_vit

    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=1000)
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(timm_vit, "_reachable", lambda host: False)
    monkeypatch.setattr(timm_vit, "_cached_weights", lambda name: str(tmp_path /
                                                                       "model.safetensors"))
    model = load_model("timm:vit_tiny_patch16_224")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values(), strict=True))
