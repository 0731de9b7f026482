"""save_pretrained()/load(): offline round trip, sharding, checksums, DGQA state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_VIT, tiny_hf_config
from kdgqa.conversion.converter import convert
from kdgqa.errors import CheckpointError, SourceError
from kdgqa.io.checkpoint import load, parse_size, save_pretrained
from kdgqa.models.timm_vit import create_timm_vit


def _trained_dgqa() -> nn.Module:
    torch.manual_seed(0)
    model = convert(create_timm_vit(**TINY_VIT), "dgqa-diff", 4, window_size=1)
    model.train()
    for _ in range(3):
        model(torch.randn(2, 3, 32, 32))
    return model.eval()


def test_round_trip_dgqa_state_and_outputs(tmp_path: Path, images: torch.Tensor) -> None:
    model = _trained_dgqa()
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "kdgqa_config.json").read_text())
    assert config["base"]["library"] == "timm" and config["base"]["kwargs"]["embed_dim"] == 48
    assert config["conversion"]["scheme"] == "dgqa-diff"
    assert config["conversion"]["num_kv_heads"] == 4
    assert config["conversion"]["scheme_options"]["window_size"] == 1
    assert "torch" in config["versions"] and "timm" in config["versions"]
    loaded = load(tmp_path)
    for name in ("step", "updates", "cache", "counts"):
        assert torch.equal(getattr(loaded.blocks[1].attn.allocator, name),
                           getattr(model.blocks[1].attn.allocator, name))
    assert int(loaded.blocks[0].attn.allocator.step) == 3
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_sharded_with_index(tmp_path: Path, images: torch.Tensor) -> None:
    model = convert(create_timm_vit(**TINY_VIT), "gqa", 3).eval()
    save_pretrained(model, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in model.state_dict().values())
    listed = (tmp_path / "checksums.sha256").read_text().split()
    assert all(name in listed for name in shards)
    with torch.no_grad():
        assert torch.equal(load(tmp_path)(images), model(images))


def test_hf_round_trip_bf16(tmp_path: Path, images: torch.Tensor) -> None:
    from transformers import ViTModel

    torch.manual_seed(0)
    model = convert(ViTModel(tiny_hf_config(), add_pooling_layer=False), "kdgqa", 4)
    model = model.to(torch.bfloat16).eval()
    save_pretrained(model, tmp_path)
    loaded = load(tmp_path)
    assert type(loaded) is ViTModel and loaded.pooler is None
    assert loaded.embeddings.cls_token.dtype == torch.bfloat16
    with torch.no_grad():
        x = images.to(torch.bfloat16)
        assert torch.equal(loaded(pixel_values=x).last_hidden_state,
                           model(pixel_values=x).last_hidden_state)


def test_plain_timm_model_spec_is_verified(tmp_path: Path, images: torch.Tensor) -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2, num_classes=4, reg_tokens=1).eval()
    convert(model, "mqa", 1)
    save_pretrained(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(load(tmp_path)(images), model(images))


def test_checksum_mismatch_refused(tmp_path: Path) -> None:
    save_pretrained(convert(create_timm_vit(**TINY_VIT), "gqa", 2), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load(tmp_path)
    (tmp_path / "checksums.sha256").unlink()
    with pytest.raises(CheckpointError, match="checksums"):
        load(tmp_path)


def test_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a kdgqa checkpoint"):
        load(tmp_path)
    (tmp_path / "kdgqa_config.json").write_text('{"format": "kdgqa", "format_version": 99}')
    with pytest.raises(CheckpointError, match="format_version"):
        load(tmp_path)


def test_unrebuildable_model_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot save"):
        save_pretrained(nn.Linear(2, 2), tmp_path)


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2MiB") == 2 * 2**20
    assert parse_size(123) == 123
    for bad in ("lots", "-1", 0, True):
        with pytest.raises(CheckpointError):
            parse_size(bad)  # type: ignore[arg-type]


def test_a_deleted_index_is_named_as_missing(tmp_path) -> None:
    import pytest as _pytest

    from kdgqa.errors import CheckpointError
    from kdgqa.io.checkpoint import INDEX_NAME, load, save_pretrained
    from kdgqa.models.timm_vit import create_timm_vit

    save_pretrained(create_timm_vit(embed_dim=48, depth=2, num_heads=6, img_size=32,
                                    patch_size=8, num_classes=5), tmp_path / "m",
                    max_shard_size="50KB")
    (tmp_path / "m" / INDEX_NAME).unlink()
    with _pytest.raises(CheckpointError, match=f"index '{INDEX_NAME}' is missing"):
        load(tmp_path / "m")
