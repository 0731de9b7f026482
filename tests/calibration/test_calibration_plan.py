"""Calibrated and similarity allocations: statistics, search, conversion, speed path, I/O."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_VIT, tiny_hf_config
from kdgqa import GroupedQueryAttention, convert, export_mha, load, save_pretrained
from kdgqa.calibration.measure import measure
from kdgqa.calibration.objective import pooling_terms
from kdgqa.calibration.partition import PoolingObjective
from kdgqa.conversion.converter import build_replacement
from kdgqa.core.ops import split_by_group_size
from kdgqa.models.locate import read_attention_layer
from kdgqa.models.timm_vit import create_timm_vit
from kdgqa.study.calibration_images import calibration_arguments
from reference import all_partitions

HEADS, HEAD_DIM = 6, 8
PLANTED = [[0, 3, 5], [1, 4], [2]]  # non-contiguous, uneven


def _timm(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return create_timm_vit(**{**TINY_VIT, **overrides}).eval()


def _images(count: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _kv_head_views(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, the K and V rows of ``qkv``'s weight and bias as ``(HEADS, HEAD_DIM, -1)``
    views, to edit heads in place."""
    width = HEADS * HEAD_DIM
    return [tensor[part * width:(part + 1) * width].view(HEADS, HEAD_DIM, -1)
            for block in model.blocks for part in (1, 2)
            for tensor in (block.attn.qkv.weight, block.attn.qkv.bias)]


def _plant(model: nn.Module, groups: list[list[int]], noise: float = 0.05) -> nn.Module:
    """Give the heads of each group near-identical K and V projections (``noise`` relative
    to the weights' spread)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for heads in _kv_head_views(model):
            spread = float(heads.std())
            for group in groups:
                for h in group[1:]:
                    heads[h] = heads[group[0]] + noise * spread * torch.randn(
                        heads[h].shape, generator=gen)
    return model


def _group_mean_reference(model: nn.Module, groups: list[list[int]]) -> nn.Module:
    """Independent reference: the MHA model, each head's K/V replaced by its group's mean
    (the same groups in every layer)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for heads in _kv_head_views(model):
            for group in groups:
                heads[group] = heads[group].mean(0, keepdim=True).expand_as(heads[group])
    return model


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x) if not hasattr(model, "config") else model(pixel_values=x).logits


# ----------------------------------------------------------------------------- the statistics


def _activations(model: nn.Module, x: torch.Tensor, layer: int):  # type: ignore[no-untyped-def]
    """q, k, v per head ``(H, B, N, D)`` of one block, read from its fused projection."""
    seen = {}

    def keep(module, args, out):  # type: ignore[no-untyped-def]
        seen["qkv"] = out.detach().double()

    handle = model.blocks[layer].attn.qkv.register_forward_hook(keep)
    with torch.no_grad():
        model(x)
    handle.remove()
    b, n, _ = seen["qkv"].shape
    q, k, v = seen["qkv"].view(b, n, 3, HEADS, HEAD_DIM).permute(2, 3, 0, 1, 4)
    return q, k, v


def _direct_statistic_loss(model, x, layer, groups, statistic):  # type: ignore[no-untyped-def]
    """The objective computed from the activations themselves, head by head."""
    q, k, v = _activations(model, x, layer)
    out_w = model.blocks[layer].attn.proj.weight.detach().double().view(-1, HEADS, HEAD_DIM)
    if statistic == "attention":
        k = k - k.mean(dim=2, keepdim=True)  # softmax ignores a per-image key offset
        m_key = [torch.einsum("bna,bnc->ac", q[i], q[i]) / (q.shape[1] * q.shape[2])
                 for i in range(HEADS)]
        m_val = [out_w[:, i].T @ out_w[:, i] for i in range(HEADS)]
    else:
        m_key = m_val = [torch.eye(HEAD_DIM, dtype=torch.float64)] * HEADS

    def part(act, weights, groups):  # type: ignore[no-untyped-def]
        loss = 0.0
        for group in groups:
            mean = act[group].mean(0)
            for i in group:
                d = act[i] - mean
                loss += float(torch.einsum("bna,ac,bnc->", d, weights[i], d))
        return loss

    def energy(act, weights):  # type: ignore[no-untyped-def]
        return sum(float(torch.einsum("bna,ac,bnc->", act[i], weights[i], act[i]))
                   for i in range(HEADS))

    total_k, total_v = energy(k, m_key), energy(v, m_val)
    assert part(k, m_key, [[h] for h in range(HEADS)]) == 0.0
    return part(k, m_key, groups) / total_k + part(v, m_val, groups) / total_v


@pytest.mark.parametrize("statistic", ["attention", "energy"])
def test_measured_objective_equals_the_loss_on_the_activations(statistic):
    model = _timm()
    x = _images()
    layers = [(f"blocks.{i}.attn", b.attn) for i, b in enumerate(model.blocks)]
    moments = measure(model, layers, x, max_images=100, batch_size=10)
    assert moments["blocks.1.attn"].images == 24
    for index, (path, module) in enumerate(layers):
        objective = PoolingObjective(pooling_terms(read_attention_layer(module).weights, moments[path],
                                                   statistic))
        for groups in ([[0, 1], [2, 3], [4, 5]], [[0, 3, 5], [1, 4], [2]], [list(range(6))]):
            direct = _direct_statistic_loss(model, x, index, groups, statistic)
            assert objective.total(groups) == pytest.approx(direct, rel=1e-7)


@pytest.mark.parametrize(("scheme", "groups"), [("calibrated", 3), ("calibrated", 2),
                                                 ("similarity", 3)])
def test_conversion_picks_the_brute_force_best_groups_of_every_layer(scheme, groups):
    model = _timm()
    x = _images()
    statistic = "attention" if scheme == "calibrated" else "energy"
    # The pooling objective alone (selection by the model's output: tests/test_selection.py).
    converted = convert(copy.deepcopy(model), scheme, groups, calibration=x, selection="pooling")
    for index, block in enumerate(converted.blocks):
        chosen = block.attn.allocator.groups()
        candidates = all_partitions(HEADS, groups, equal=scheme == "similarity")
        if scheme == "calibrated":
            losses = [_direct_statistic_loss(model, x, index, c, statistic) for c in candidates]
            mine = _direct_statistic_loss(model, x, index, chosen, statistic)
        else:  # keys only
            _, k, _ = _activations(model, x, index)

            def key_loss(c, k=k):  # type: ignore[no-untyped-def]
                return sum(float(((k[i] - k[g].mean(0)) ** 2).sum()) for g in c for i in g)

            losses = [key_loss(c) for c in candidates]
            mine = key_loss(chosen)
        assert mine == pytest.approx(min(losses), rel=1e-9)
        record = converted.kdgqa_conversion["calibration"][f"blocks.{index}.attn"]
        assert record["groups"] == chosen and record["loss"] <= record["contiguous_loss"] + 1e-12


# ----------------------------------------------------------------------------- conversion


def test_as_many_groups_as_heads_is_the_original_model():
    model = _timm()
    x = _images(4)
    converted = convert(copy.deepcopy(model), "calibrated", HEADS, calibration=_images())
    assert converted.blocks[0].attn.allocator.head_order.tolist() == list(range(HEADS))
    assert torch.equal(_logits(converted, x), _logits(model, x))


def test_permuting_query_heads_and_output_columns_preserves_the_function():
    model = _timm()
    x = _images(4)
    for block in model.blocks:
        block.attn = build_replacement(read_attention_layer(block.attn), "calibrated", HEADS, "mean", {},
                                        [[3], [0], [5], [1], [4], [2]])
    assert model.blocks[0].attn.allocator.head_order.tolist() == [3, 0, 5, 1, 4, 2]
    assert not torch.equal(model.blocks[0].attn.qkv.weight[:48], _timm().blocks[0].attn.qkv.weight[:48])
    torch.testing.assert_close(_logits(model, x), _logits(_timm(), x), atol=1e-5, rtol=0)


def test_uneven_non_contiguous_groups_equal_an_independent_group_mean_reference():
    model = _plant(_timm(), PLANTED)
    x = _images(4, seed=5)
    converted = convert(copy.deepcopy(model), "calibrated", 3, calibration=_images())
    for block in converted.blocks:
        allocator = block.attn.allocator
        assert allocator.groups() == PLANTED
        assert allocator.head_order.tolist() == [0, 3, 5, 1, 4, 2]
        assert allocator.host_counts == (3, 2, 1) and not allocator.uniform
        assert allocator.static_kv_index.tolist() == [0, 0, 0, 1, 1, 2]
    reference = _group_mean_reference(model, PLANTED)
    torch.testing.assert_close(_logits(converted, x), _logits(reference, x), atol=1e-5, rtol=0)
    # ... and contiguous pooling (what the paper does) is measurably further from the model.
    gqa_like = _group_mean_reference(model, [[0, 1, 2], [3, 4], [5]])
    assert (_logits(gqa_like, x) - _logits(model, x)).abs().max() > 10 * (
        _logits(converted, x) - _logits(model, x)).abs().max()


def test_similarity_finds_equal_planted_groups_and_runs_as_static_gqa():
    planted = [[0, 3], [1, 5], [2, 4]]
    model = _plant(_timm(), planted)
    converted = convert(copy.deepcopy(model), "similarity", 3, calibration=_images())
    allocator = converted.blocks[1].attn.allocator
    assert allocator.groups() == planted and allocator.uniform
    assert allocator.static_kv_index.tolist() == [0, 0, 1, 1, 2, 2]
    x = _images(4, seed=5)
    reference = _group_mean_reference(model, planted)
    torch.testing.assert_close(_logits(converted, x), _logits(reference, x), atol=1e-5, rtol=0)


def test_hugging_face_vit_converts_and_round_trips(tmp_path):
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_hf_config()).eval()
    x = _images(4)
    same = convert(copy.deepcopy(model), "calibrated", HEADS, calibration=_images(8))
    torch.testing.assert_close(_logits(same, x), _logits(model, x), atol=1e-5, rtol=0)
    converted = convert(model, "calibrated", 4, calibration=[(_images(8), None)])
    save_pretrained(converted, tmp_path)
    reloaded = load(tmp_path)
    assert torch.equal(_logits(reloaded, x), _logits(converted, x))


@pytest.mark.parametrize(("call", "match"), [
    (lambda m: convert(m, "calibrated", 3), "needs calibration"),
    (lambda m: convert(m, "gqa", 3, calibration=_images()), "only used by schemes"),
    (lambda m: convert(m, "calibrated", 3, calibration=torch.randn(2, 3, 16, 16)), "do not fit"),
    (lambda m: convert(m, "calibrated", 3, calibration=torch.randn(3, 32, 32)), r"\(N, C, H, W\)"),
    (lambda m: convert(m, "calibrated", 3, calibration=[]), "no images"),
    (lambda m: convert(m, "similarity", 4, calibration=_images()), "divisible"),
    (lambda m: convert(m, "calibrated", 3, calibration=_images(), statistic="norm"),
     "unknown statistic"),
    (lambda m: convert(m, "calibrated", 3, calibration=_images(), calibration_images=0),
     "calibration_images"),
])
def test_bad_calibration_leaves_the_model_untouched(call, match):
    model = _timm().train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        call(model)
    assert not any(isinstance(m, GroupedQueryAttention) for m in model.modules())
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_uses_at_most_calibration_images():
    model = _timm()
    layers = [("blocks.0.attn", model.blocks[0].attn)]
    batches = [(_images(5, seed=s), torch.zeros(5)) for s in range(4)]
    assert measure(model, layers, batches, max_images=12, batch_size=4)["blocks.0.attn"].images == 12
    assert measure(model, layers, _images(7), max_images=512)["blocks.0.attn"].images == 7


# ----------------------------------------------------------------------------- the static path


def _calibrated_module(counts: list[int], order: list[int]) -> GroupedQueryAttention:
    torch.manual_seed(0)
    module = GroupedQueryAttention(48, HEADS, len(counts), "calibrated")
    module.allocator.set_groups(counts, order)
    return module


def test_group_size_runs():
    assert split_by_group_size((3, 2, 1)) == [(0, 3, 0, 1), (3, 5, 1, 2), (5, 6, 2, 3)]
    assert split_by_group_size((2, 2, 1, 1)) == [(0, 4, 0, 2), (4, 6, 2, 4)]
    assert split_by_group_size((1, 2, 2, 1)) == [(0, 1, 0, 1), (1, 5, 1, 3), (5, 6, 3, 4)]


@pytest.mark.parametrize(("counts", "calls"), [([3, 2, 1], 3), ([2, 2, 1, 1], 2), ([4, 2], 2)])
@pytest.mark.parametrize("training", [True, False])
def test_split_static_path_equals_the_expanded_path(counts, calls, training, monkeypatch):
    module = _calibrated_module(counts, [5, 0, 3, 1, 2, 4][:HEADS]).train(training)
    x = torch.randn(3, 7, 48, requires_grad=True)
    weight = torch.randn(3, 7, 48)
    module.expand_method = "gather"
    expanded = module(x)
    expected = torch.autograd.grad((expanded * weight).sum(), [x, *module.parameters()])
    sdpa = F.scaled_dot_product_attention
    seen = []
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append(k["enable_gqa"]) or sdpa(*a, **k))
    module.expand_method = "split"
    split = module(x)
    assert len(seen) == calls and any(seen)
    grads = torch.autograd.grad((split * weight).sum(), [x, *module.parameters()])
    torch.testing.assert_close(split, expanded, atol=1e-6, rtol=0)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_split_path_passes_causal_and_per_head_masks():
    module = _calibrated_module([3, 2, 1], list(range(HEADS))).eval()
    x = torch.randn(2, 5, 48)
    mask = torch.randn(2, HEADS, 5, 5)
    outs = {}
    for method in ("gather", "split"):
        module.expand_method = method
        outs[method] = (module(x, attn_mask=mask), module(x, is_causal=True))
    for got, want in zip(outs["split"], outs["gather"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["auto", "split"])
def test_static_uneven_path_compiles_fullgraph(method):
    torch._dynamo.reset()
    module = _calibrated_module([3, 2, 1], [2, 0, 1, 5, 4, 3]).train()
    module.expand_method = method
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 48)
    torch.testing.assert_close(compiled(x), module(x), atol=1e-6, rtol=0)


def test_invalid_groups_are_refused():
    module = _calibrated_module([3, 2, 1], list(range(HEADS)))
    with pytest.raises(ValueError, match="summing to 6"):
        module.allocator.set_groups([3, 2, 2], list(range(HEADS)))
    with pytest.raises(ValueError, match="not a permutation"):
        module.allocator.set_groups([3, 2, 1], [0, 0, 1, 2, 3, 4])
    state = module.state_dict()
    state["allocator.counts"] = torch.tensor([4, 2, 1])
    with pytest.raises(ValueError, match="summing to 6"):
        module.load_state_dict(state)
    similar = GroupedQueryAttention(48, HEADS, 3, "similarity")
    with pytest.raises(ValueError, match="equal groups"):
        similar.allocator.set_groups([3, 2, 1], list(range(HEADS)))


# ----------------------------------------------------------------------------- saving


def test_checkpoint_and_mha_export_round_trip(tmp_path):
    import timm

    model = convert(_plant(_timm(), PLANTED), "calibrated", 3, calibration=_images())
    x = _images(4, seed=5)
    save_pretrained(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "kdgqa_config.json").read_text())
    assert config["conversion"]["scheme_options"]["calibration"] == "recorded"
    reloaded = load(tmp_path / "ckpt")
    allocator = reloaded.blocks[0].attn.allocator
    assert allocator.groups() == PLANTED and allocator.host_counts == (3, 2, 1)
    assert allocator.static_kv_index.tolist() == [0, 0, 0, 1, 1, 2]
    assert torch.equal(_logits(reloaded, x), _logits(model, x))

    export_mha(model, tmp_path / "mha")
    exported = json.loads((tmp_path / "mha" / "config.json").read_text())
    plain = timm.create_model(exported["architecture"], pretrained=False,
                              checkpoint_path=str(tmp_path / "mha" / "model.safetensors"),
                              **exported["model_args"]).eval()
    assert type(plain.blocks[0].attn) is timm.layers.Attention
    torch.testing.assert_close(_logits(plain, x), _logits(model, x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- data sources


def _image_folder(root: Path, count: int = 6, size: int = 32) -> Path:
    from PIL import Image

    gen = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(count):
            pixels = gen.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_cli_converts_with_calibration_from_an_image_folder(tmp_path, capsys):
    from safetensors.torch import save_file

    from kdgqa.cli import main

    images = _image_folder(tmp_path / "images")
    source = tmp_path / "src" / "model.safetensors"
    source.parent.mkdir()
    save_file(_timm().state_dict(), str(source))
    (source.parent / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "model_args": TINY_VIT}))
    base = ["convert", "--model", str(source), "--kv-heads", "3"]

    status = main([*base, "--scheme", "calibrated", "--calibration", str(images),
                   "--calibration-images", "8", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert status == 0 and err == "", err
    assert "calibration: 8 images from" in out and "from original heads {" in out
    reloaded = load(tmp_path / "out")
    assert reloaded.blocks[0].attn.allocator.options["calibration_images"] == 8
    assert sum(reloaded.blocks[0].attn.allocator.host_counts) == HEADS

    status = main([*base, "--scheme", "similarity", "--calibration", f"imagefolder:{images}",
                   "--out", str(tmp_path / "sim"), "--format", "mha"])
    assert status == 0 and (tmp_path / "sim" / "model.safetensors").is_file()
    capsys.readouterr()

    for extra, match in [
        (["--scheme", "calibrated"], "needs --calibration"),
        (["--scheme", "gqa", "--calibration", str(images)], "only used by schemes"),
        (["--scheme", "calibrated", "--calibration", "nowhere:x"], "neither NAME:ROOT"),
        (["--scheme", "calibrated", "--calibration", f"imagefolder:{tmp_path / 'none'}"],
         "not found"),
        (["--scheme", "calibrated", "--calibration", "cifar10:" + str(tmp_path)], "not found"),
        (["--scheme", "calibrated", "--calibration", str(images), "--calibration-images", "0"],
         ">= 1"),
    ]:
        status = main([*base, *extra, "--out", str(tmp_path / "bad")])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert status == 2 and out == "" and len(lines) == 1 and match in lines[0], err
        assert not (tmp_path / "bad").exists()


def test_study_calibration_is_the_first_training_images_as_training_sees_them():
    from kdgqa.study.config import DataConfig
    from kdgqa.study.data import Batches, ImageTensors

    data = ImageTensors(torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8),
                        torch.zeros(20, dtype=torch.long))
    cfg = DataConfig(name="digits", image_size=12, mean=0.3, std=0.2)
    assert calibration_arguments("gqa", {}, data, cfg) == {}
    batches = list(calibration_arguments("calibrated", {"calibration_images": 13}, data,
                                         cfg)["calibration"])
    got = torch.cat(batches)
    expected = Batches(data, 4, image_size=12, mean=0.3, std=0.2, shuffle=False).prepare(
        torch.arange(13))
    assert torch.equal(got, expected)
    default = calibration_arguments("similarity", {}, data, cfg)["calibration"]
    assert torch.cat(list(default)).shape == (20, 1, 12, 12)


def test_tiny_study_runs_calibrated_and_similarity_cells(tmp_path):
    from kdgqa.study.config import parse_config
    from kdgqa.study.experiment import run_experiment

    config = parse_config({
        "output_dir": str(tmp_path / "study"), "device": "cpu", "progress": False,
        "model": {"embed_dim": 24, "depth": 1, "num_heads": 6},
        "pretrain": {"epochs": 1, "batch_size": 64, "lr": 3e-3},
        "uptrain": {"epochs": 1, "batch_size": 64, "lr": 1e-3},
        "grid": {"schemes": ["calibrated", "similarity"], "kv_heads": [3], "seeds": [0],
                 "include_mha": False,
                 "scheme_options": {"calibrated": {"calibration_images": 64}}},
    })
    run_experiment(config, log=None)
    rows = [json.loads(line) for line in
            (tmp_path / "study" / "results.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in rows] == ["calibrated-g3-s0", "similarity-g3-s0"]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
