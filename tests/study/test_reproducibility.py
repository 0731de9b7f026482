"""Same command, same numbers: a reduced default study gives bitwise identical results across
OMP_NUM_THREADS settings and worker-process counts (the study fixes its own threads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REDUCED = ["pretrain.epochs=3", "uptrain.epochs=1", "grid.schemes=[gqa, kdgqa, pgqa]",
           "grid.kv_heads=[2]", "grid.seeds=[0, 1]"]


def _study(out: Path, threads: str, *extra: str) -> list[dict[str, object]]:
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    args = [sys.executable, "-m", "kdgqa.cli", "experiment", "-o", str(out), "--no-progress",
            "--device", "cpu"]
    for item in [*REDUCED, *extra]:
        args += ["--set", item]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cpu threads: 1 (automatic" in done.stdout
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_results_are_bitwise_identical_across_thread_and_worker_counts(tmp_path):
    one = _study(tmp_path / "a", "1")
    two = _study(tmp_path / "b", "2", "cpu_workers=2")
    keys = ("run_id", "test_acc", "test_loss", "converted_test_acc", "best_val_acc",
            "best_val_loss", "best_step")
    assert [[r[k] for k in keys] for r in one] == [[r[k] for k in keys] for r in two]
    assert len(one) == 8  # 2 MHA + 3 schemes x 2 seeds
    weights = "pretrain/model/model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
