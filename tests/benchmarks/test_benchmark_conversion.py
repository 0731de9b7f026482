"""benchmarks/conversion_time.py: a smoke run on the CPU with a tiny local checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import conversion_time as bench
from kdgqa.io.checkpoint import save_pretrained
from kdgqa.models.timm_vit import create_timm_vit


def test_conversion_benchmark_times_every_setting(tmp_path: Path, capsys) -> None:
    save_pretrained(create_timm_vit(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                    num_heads=6, num_classes=5), tmp_path / "vit")
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(tmp_path / "vit"), "--images", "8", "--kv-heads", "2",
                       "3", "--distill-steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    settings = [(r["setting"], r["kv_heads"]) for r in result["rows"]]
    assert settings == [(s, g) for g in (2, 3)
                        for s in ("mean", "fit", "align+fit", "align+fit+distill")]
    assert all(r.get("convert_s", r.get("distill_s", -1)) >= 0 for r in result["rows"])
    assert json.loads(capsys.readouterr().out) == result
