"""benchmarks/headmap_attention.py: every variant computes the same attention (CPU, tiny,
forward only: FlexAttention has no CPU backward), and the script refuses to run without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import headmap_attention as bench

pytest.importorskip("torch.nn.attention.flex_attention")


def test_every_variant_matches_the_expansion_path():
    b, n, h, g, d = 2, 13, 6, 3, 16
    qkv = torch.randn(b, n, h + 2 * g, d, generator=torch.Generator().manual_seed(0))
    maps = bench.head_maps(b, h, g, "cpu")
    assert maps["uneven"].tolist() == [0, 0, 0, 1, 1, 2]
    assert maps["per_sample"].shape == (b, h)
    for name, head_map in maps.items():
        calls = bench.build_calls(qkv, h, g, head_map, name, compile_flex=False)
        assert ("sdpa_enable_gqa" in calls) == (name == "uniform")
        want = calls["expand"]()
        for variant, call in calls.items():
            # fp32, sums of <= N + D = 29 products: well inside 1e-5
            torch.testing.assert_close(call(), want, rtol=1e-5, atol=1e-5, msg=variant)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(capsys):
    assert bench.main(["--shapes", "vit_b"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
