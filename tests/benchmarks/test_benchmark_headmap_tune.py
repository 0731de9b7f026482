"""benchmarks/headmap_tune.py: the choice of one setting per head dim from timed records,
the round trip into the library's tile type, and the message without CUDA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import headmap_tune as tune
import tiles_file
from kdgqa.core.headmap_attention import HeadmapTiles, Tiles


def _rec(shape: str, kernel: str, tiles: list[int], ms: float | None) -> dict[str, object]:
    rec: dict[str, object] = {"shape": shape, **tune.SHAPES[shape], "kernel": kernel,
                              "tiles": tiles}
    if ms is None:
        rec["error"] = "OutOfResources: shared memory"
    else:
        rec["ms"] = ms
    return rec


def test_choice_minimises_the_geometric_mean_slowdown_over_shapes():
    a, b, c = [64, 64, 4, 2], [128, 64, 8, 3], [128, 128, 8, 4]
    records = [
        # a is best on vit_b, b on vit_l; b's slowdowns (1.1, 1.0) beat a's (1.0, 1.3)
        _rec("vit_b", "forward", a, 1.0), _rec("vit_l", "forward", a, 1.3),
        _rec("vit_b", "forward", b, 1.1), _rec("vit_l", "forward", b, 1.0),
        # c failed on one shape: never chosen, even if fastest where it ran
        _rec("vit_b", "forward", c, 0.5), _rec("vit_l", "forward", c, None),
        _rec("d32", "grad_kv", a, 2.0), _rec("d32", "grad_kv", b, 1.0),
    ]
    chosen = tune.choose(records)
    assert chosen["64"]["forward"]["tiles"] == b
    assert chosen["64"]["forward"]["shapes"] == ["vit_b", "vit_l"]
    assert chosen["32"]["grad_kv"]["tiles"] == b


def test_chosen_tiles_read_back_as_library_settings(tmp_path):
    per = {k: {"tiles": [64, 32, 4, 2]} for k in tune.KERNELS}
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"chosen": {"64": per}, "records": []}))
    assert tiles_file.chosen_tiles(path) == {64: HeadmapTiles.same(64, 32)}
    assert HeadmapTiles.same(64, 32).forward == Tiles(64, 32, 4, 2)


def test_candidates_are_valid_tiles():
    for kernel in tune.KERNELS:
        for tiles in tune.candidates(kernel):
            tiles.check(kernel)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(capsys):
    assert tune.main(["--dims", "64"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
