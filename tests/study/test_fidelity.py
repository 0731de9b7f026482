"""Fidelity of a conversion to its MHA source: the comparison itself and ``kdgqa fidelity``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_VIT
from kdgqa.cli import main
from kdgqa.conversion.converter import convert
from kdgqa.models.timm_vit import create_timm_vit
from kdgqa.study.fidelity import Outputs, compare, model_outputs


def _batches(count: int = 12, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, 32, 32, generator=gen)
    y = torch.randint(0, TINY_VIT["num_classes"], (count,), generator=gen)
    return [(x[:5], y[:5]), (x[5:], y[5:])]


def test_compare_counts_image_by_image() -> None:
    labels = torch.tensor([0, 1, 2, 1])
    ref = Outputs(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]),
                  torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]]), labels)
    cand = Outputs(torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0], [0.0, 2.0]]),
                   torch.tensor([[3.0, 0, 0], [0, 0, 3.0], [0, 0, 3.0], [0, 3.0, 0]]), labels)
    fid = compare(ref, cand)
    assert fid.images == 4
    assert fid.reference_top1 == pytest.approx(3 / 4)  # image 3 is class 1, ref says 0
    assert fid.top1 == pytest.approx(3 / 4)  # wrong on image 1 only
    assert fid.agreement == pytest.approx(2 / 4)
    assert fid.feature_cosine == pytest.approx((1 - 1 + 1 + 0) / 4)
    assert fid.logit_relative_error == pytest.approx(
        float((cand.logits - ref.logits).norm() / ref.logits.norm()))
    assert compare(ref, ref).agreement == 1.0 and compare(ref, ref).logit_relative_error == 0.0
    with pytest.raises(ValueError, match="different images"):
        compare(ref, Outputs(cand.pre_logits, cand.logits, labels.flip(0)))


def test_an_exact_conversion_is_fully_faithful_and_a_lossy_one_is_not() -> None:
    torch.manual_seed(0)
    base = create_timm_vit(**TINY_VIT).train()
    reference = model_outputs(base, _batches())
    assert base.training  # evaluation mode only while measuring
    assert reference.pre_logits.shape == (12, TINY_VIT["embed_dim"])
    assert reference.logits.shape == (12, TINY_VIT["num_classes"])

    import copy

    same = compare(reference, model_outputs(convert(copy.deepcopy(base), "gqa", 6),
                                            _batches()))
    assert same.agreement == 1.0 and same.feature_cosine == pytest.approx(1.0, abs=1e-6)
    assert same.logit_relative_error < 1e-5
    lossy = compare(reference, model_outputs(convert(copy.deepcopy(base), "mqa", 1),
                                             _batches()))
    assert lossy.feature_cosine < 0.999 and lossy.logit_relative_error > 1e-3


def test_models_without_timm_features_are_refused() -> None:
    with pytest.raises(ValueError, match="has no classifier kdgqa can read"):
        model_outputs(torch.nn.Linear(4, 2), [(torch.randn(2, 4), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="no images"):
        model_outputs(create_timm_vit(**TINY_VIT), [])


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MHA ViT pretrained on digits and a study config that converts it."""
    from kdgqa.study.config import parse_config
    from kdgqa.study.experiment import run_experiment

    root = tmp_path_factory.mktemp("fidelity")
    raw = {"output_dir": str(root / "pre"), "device": "cpu", "progress": False,
           "model": {"embed_dim": 24, "depth": 1, "num_heads": 6},
           "pretrain": {"epochs": 20, "batch_size": 64, "lr": 3e-3},
           "grid": {"schemes": ["gqa"], "kv_heads": [2], "seeds": [0]}}
    run_experiment(parse_config(raw), pretrain_only=True, log=None)
    study = {"output_dir": str(root / "unused"), "device": "cpu",
             "model": {"pretrained": str(root / "pre" / "pretrain" / "model")},
             "pretrain": None,
             "grid": {"schemes": ["gqa", "kdgqa", "kdgqa-ref", "pgqa-ref", "calibrated"],
                      "kv_heads": [3, 6], "seeds": [0],
                      "variants": {"kdgqa-ref": {"scheme": "kdgqa", "reference": True},
                                   "pgqa-ref": {"scheme": "pgqa", "reference": True}}}}
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    return config


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_fidelity_of_every_grid_cell_on_the_models_own_task(
    digits_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fidelity.json"
    status, printed, err = _cli(capsys, "fidelity", str(digits_study), "--data", "digits",
                                "--images", "200", "--device", "cpu", "-o", str(out))
    assert status == 0, err
    doc = json.loads(out.read_text())
    rows = {(r["scheme"], r["kv_heads"]): r for r in doc["rows"]}
    assert next(iter(rows)) == ("mha", 6) and len(rows) == 1 + 5 * 2
    assert doc["images"] == 200 and doc["data"] == "digits" and doc["commit"]
    mha = rows["mha", 6]
    assert mha["agreement"] == 1.0 and mha["top1"] == mha["reference_top1"] > 0.5
    # G = H: pooling one head is that head, and the sound key-driven map is the identity
    # (the official min-max arithmetic is not: kdgqa-ref moves heads even there).
    for label in ("gqa", "kdgqa", "calibrated"):
        assert rows[label, 6]["agreement"] == 1.0, label
        assert rows[label, 6]["logit_relative_error"] < 1e-5, label
    assert rows["pgqa-ref", 6]["logit_relative_error"] > 1e-3  # noise at evaluation
    assert rows["gqa", 3]["logit_relative_error"] > 1e-3
    assert rows["calibrated", 3]["scheme_options"] == {}
    assert rows["kdgqa-ref", 3]["base_scheme"] == "kdgqa"
    assert "| calibrated | 3/6 |" in printed


def test_fidelity_refuses_data_of_another_task_in_one_line(
    digits_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    folder = tmp_path / "two-classes"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), color=40 * i).save(folder / label / f"{i}.png")
    out = tmp_path / "f.json"
    status, _, err = _cli(capsys, "fidelity", str(digits_study), "--data", str(folder),
                          "--images", "4", "--device", "cpu", "-o", str(out))
    assert status == 2 and err.count("\n") == 1
    assert "10 classes" in err and "2" in err and not out.exists()
    status, _, err = _cli(capsys, "fidelity", str(digits_study), "--data", "nowhere:x")
    assert status == 2 and "--data 'nowhere:x' is neither NAME:ROOT" in err
    status, _, err = _cli(capsys, "fidelity", str(digits_study), "--data", "digits",
                          "--images", "0")
    assert status == 2 and "--images" in err
    status, _, err = _cli(capsys, "fidelity", str(digits_study), "--data", "digits",
                          "--set", "model.pretrained=null")
    assert status == 2 and "needs model.pretrained" in err


def test_per_layer_models_convert_one_layer_each() -> None:
    import copy

    from kdgqa.models.locate import grouped_layers
    from kdgqa.study.fidelity import per_layer_models

    torch.manual_seed(0)
    base = create_timm_vit(**{**TINY_VIT, "depth": 2}).eval()
    converted = convert(copy.deepcopy(base), "gqa", 2)
    hybrids = list(per_layer_models(base, converted))
    assert [(i, p) for i, p, _ in hybrids] == [(0, "blocks.0.attn"), (1, "blocks.1.attn")]
    reference = model_outputs(base, _batches())
    for index, _path, hybrid in hybrids:
        assert [p for p, _ in grouped_layers(hybrid)] == [f"blocks.{index}.attn"]
        assert compare(reference, model_outputs(hybrid, _batches())).logit_relative_error > 1e-4
    # The sources are left as they were: base is MHA, converted keeps both grouped layers.
    assert list(grouped_layers(base)) == [] and len(list(grouped_layers(converted))) == 2


def test_fidelity_per_layer_rows(digits_study: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "layers.json"
    status, printed, err = _cli(capsys, "fidelity", str(digits_study), "--data", "digits",
                                "--images", "100", "--device", "cpu", "--per-layer",
                                "--set", "grid.schemes=[gqa]", "--set", "grid.kv_heads=[3]",
                                "-o", str(out))
    assert status == 0, err
    rows = json.loads(out.read_text())["rows"]
    # The digits model has one block: the whole conversion and "only layer 0" are one model.
    whole, layer0 = [r for r in rows if r["scheme"] == "gqa"]
    assert "layer" not in whole and layer0["layer"] == 0 and layer0["path"] == "blocks.0.attn"
    assert layer0["agreement"] == whole["agreement"]
    assert layer0["feature_cosine"] == pytest.approx(whole["feature_cosine"], abs=1e-6)
    assert "| gqa | 3/6 | 0 only |" in printed and "| gqa | 3/6 | all |" in printed
