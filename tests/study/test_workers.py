"""Grid runs in worker processes: an error in one stops the study with that one line."""

from __future__ import annotations

import subprocess
import sys


def test_a_worker_error_is_one_line_and_exit_status_1(tmp_path):
    args = [sys.executable, "-m", "kdgqa.cli", "experiment", "-o", str(tmp_path / "s"),
            "--no-progress", "--device", "cpu", "--set", "pretrain.epochs=1",
            "--set", "uptrain.lr=50", "--set", "cpu_workers=2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 1
    assert "grid: 33 runs in 2 worker processes" in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdgqa: error: [1/33] mha-g6-s0: loss ")
    assert "stopped without saving" in lines[0]
