"""benchmarks/model.py: FLOP formula, smoke run on the CPU, official-style attention fidelity."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import kdgqa  # noqa: E402
import model as bench  # noqa: E402
import official_reference as official  # noqa: E402
import table  # noqa: E402

VIT_B = bench.ViTArch(patches=196, prefix_tokens=1, dim=768, depth=12, heads=12, head_dim=64,
                      mlp_hidden=3072, patch_in=768, num_classes=1000)


def test_vit_b_224_forward_flops_match_the_issue():
    assert bench.vit_forward_flops(VIT_B) == pytest.approx(35.2e9, rel=0.01)
    # GQA with 6 KV heads drops 1/3 of the qkv projection: 2 x 12 x 197 x 768 x 768 MACs
    saved = bench.vit_forward_flops(VIT_B) - bench.vit_forward_flops(VIT_B, kv_heads=6)
    assert saved == 2 * 12 * 197 * 768 * 768


def test_arch_is_read_from_timm():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    assert bench.vit_arch(model) == VIT_B


def test_smoke_run_writes_well_formed_rows(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert bench.main(["--smoke", "--schemes", "gqa,kdgqa,dgqa-diff,pgqa",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    impls = {(r["impl"], r["scheme"]) for r in rows}
    assert impls == {("timm", "mha"), ("kdgqa", "gqa"), ("kdgqa", "kdgqa"),
                     ("kdgqa", "dgqa-diff"), ("kdgqa", "pgqa"), ("official", "mha"),
                     ("official", "gqa"), ("official", "kdgqa"), ("official", "dgqa-diff"),
                     ("official", "pgqa")}
    assert len(rows) == 2 * len(impls)
    for r in rows:
        assert "error" not in r, r
        assert r["mode"] in ("train", "infer") and r["compiled"] is False
        for key in ("model", "img_size", "batch", "scheme", "impl", "img_per_s", "ms_per_step",
                    "peak_mem_gib", "mfu", "mfu_mha_flops", "fwd_gflop_per_img", "torch",
                    "timm", "gpu", "data", "optimizer"):
            assert key in r, key
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["kv_heads"] == (6 if r["scheme"] == "mha" else 3)
        assert r["fwd_gflop_per_img"] <= r["mha_fwd_gflop_per_img"]
    assert table.model_tables(rows).count("| official | kdgqa |") == 2  # train, infer pivots
    assert "| tiny | 32 | 4 | train | no | kdgqa | kdgqa |" in table.model_tables(rows, full=True)


def test_plan_keeps_official_rows_eager_and_baselines_per_setting():
    args = bench.parse_args(["--models", "vit_b", "--batch", "128,256", "--compile", "both",
                             "--schemes", "kdgqa,dgqa-ema", "--list"])
    configs = bench.plan(args)
    assert not any(c.compiled for c in configs if c.impl == "official")
    for batch in (128, 256):
        for compiled in (False, True):
            assert any(c.impl == "timm" and c.batch == batch and c.compiled == compiled
                       for c in configs)
    assert args.official == ["mha", "gqa", "kdgqa", "dgqa-ema"]


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, embed_dim=48, depth=2, num_heads=6, num_classes=5)


@pytest.mark.parametrize(("kind", "scheme", "options"), [
    ("mha", None, {}),
    ("gqa", "gqa", {}),
    ("kdgqa", "kdgqa", {"reference": True}),
])
def test_official_style_matches_the_library(kind, scheme, options, images):
    """The loop baseline computes what it claims: timm's MHA, GQA, reference KDGQA."""
    base = _tiny_vit().eval()
    ours = _tiny_vit().eval()
    if scheme is not None:
        kdgqa.convert(ours, scheme, 3, **options)
    loop = _tiny_vit().eval()
    official.replace_attention(loop, kind, 3)
    with torch.no_grad():
        torch.testing.assert_close(loop(images), ours(images), rtol=1e-4, atol=1e-5)
        if kind == "mha":
            torch.testing.assert_close(loop(images), base(images), rtol=1e-4, atol=1e-5)


def test_official_style_dgqa_follows_the_clock_and_pgqa_adds_noise(images):
    model = _tiny_vit().train()
    clock = official.replace_attention(model, "dgqa-ema", 3, window_size=2)
    attn = model.blocks[0].attn
    clock.step = 1  # not a window step: allocation and cache untouched
    model(images)
    assert attn.cache.abs().sum() == 0
    clock.step = 2
    model(images)
    assert attn.cache.abs().sum() > 0 and sum(attn.splits) == 6

    noisy = _tiny_vit().eval()
    official.replace_attention(noisy, "pgqa", 3)
    with torch.no_grad():
        assert not torch.equal(noisy(images), noisy(images))  # noise at evaluation too


def test_official_style_degenerate_norms_terminate():
    k = torch.ones(2, 3, 4, 8)  # equal norms: the official min-max divides 0 by 0
    assert sum(official.minmax_counts(k, 6)) == 6
    assert sum(official.window_counts(torch.zeros(3), 6)) == 6


def test_ratios_use_the_baseline_of_the_same_run():
    def row(run, impl, scheme, rate, compiled=False):
        return {"run_id": run, "model": "vit_b", "img_size": 224, "batch": 128, "mode": "train",
                "compiled": compiled, "impl": impl, "scheme": scheme, "img_per_s": rate,
                "ms_per_step": 1.0, "kv_heads": 6, "mfu": 0.3, "mfu_mha_flops": 0.3,
                "peak_mem_gib": 1.0}

    rows = [row("small", "timm", "mha", 50.0), row("small", "kdgqa", "calibrated", 60.0),
            row("main", "timm", "mha", 100.0), row("main", "kdgqa", "kdgqa", 90.0),
            row("main", "official", "kdgqa", 45.0), row("main", "kdgqa", "kdgqa", 120.0, True)]
    base = table.Baselines(rows)
    assert base.vs_timm(rows[1]) == pytest.approx(1.2)
    assert base.vs_timm(rows[3]) == pytest.approx(0.9)
    assert base.vs_official(rows[3]) == pytest.approx(2.0)
    assert math.isnan(base.vs_official(rows[5]))  # compiled rows have no official baseline
    text = table.model_tables(rows)
    assert "| timm | mha | 100 (1.00x) |" in text  # the larger run's baseline is shown
    assert "0.90x" in text and "1.20x" in text


def test_a_scheme_measured_again_shows_its_newest_row_against_its_own_baseline():
    def row(run, impl, scheme, rate):
        return {"run_id": run, "model": "vit_b", "img_size": 224, "batch": 128, "mode": "train",
                "compiled": False, "impl": impl, "scheme": scheme, "img_per_s": rate,
                "ms_per_step": 1.0, "kv_heads": 6, "mfu": 0.3, "mfu_mha_flops": 0.3,
                "peak_mem_gib": 1.0}

    main, later = "20261128T221642-vm-1-cuda:0", "20261129T015514-vm-2-cuda:0"
    rows = [row(main, "timm", "mha", 100.0), row(main, "kdgqa", "gqa", 107.0),
            row(main, "kdgqa", "pgqa", 90.0), row(main, "official", "pgqa", 45.0),
            row(later, "timm", "mha", 80.0), row(later, "kdgqa", "pgqa", 84.0)]
    train = table.model_tables(rows).split("**kdgqa / official")[0]  # rows are train only
    assert "| timm | mha | 100 (1.00x) |" in train  # the main run's baseline
    assert "| kdgqa | pgqa | 84 (1.05x) |" in train  # the re-measured row, own baseline
    assert "90 (0.90x)" not in train
    lines = [line for line in train.splitlines() if line.startswith("| kdgqa")]
    assert [line.split(" | ")[1] for line in lines] == ["gqa", "pgqa"]  # the main run's order
    # The official-style ratio is a same-run ratio: only the main run has one for pgqa.
    assert "| kdgqa | pgqa | 2.00x |" in table.model_tables(rows)
