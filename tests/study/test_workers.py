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


def _spawned_children(pid: int) -> list[int]:
    from pathlib import Path

    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and b"multiprocessing" in cmdline and b"spawn_main" in cmdline:
            children.append(int(entry.name))
    return children


def test_a_worker_killed_from_outside_is_one_line_and_exit_status_1(tmp_path):
    import os
    import signal
    import time
    from pathlib import Path

    import pytest

    if not Path("/proc").is_dir():
        pytest.skip("needs /proc to find the worker processes")
    args = [sys.executable, "-m", "kdgqa.cli", "experiment", "-o", str(tmp_path / "s"),
            "--no-progress", "--device", "cpu", "--set", "pretrain.epochs=1",
            "--set", "uptrain.epochs=30", "--set", "cpu_workers=2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            workers = _spawned_children(proc.pid)
        assert len(workers) == 2, "the workers never started"
        time.sleep(2)
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped with exit code -9" in lines[0], err[-2000:]
    assert "continue with --resume" in lines[0]


def test_ctrl_c_while_the_workers_start_is_not_lost(monkeypatch) -> None:
    import multiprocessing as mp
    import os
    import signal
    import time

    import pytest

    from kdgqa.study.workers import WorkerPool

    start = mp.context.SpawnProcess.start

    def start_then_interrupt(self) -> None:  # type: ignore[no-untyped-def]
        start(self)
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C while the pool is starting

    monkeypatch.setattr(mp.context.SpawnProcess, "start", start_then_interrupt)
    # As in a terminal: Python's Ctrl-C handler (a test run launched in the background of a
    # non-interactive shell starts with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), WorkerPool(2):
            time.sleep(5)  # the interrupt arrives here at the latest, not never
    finally:
        signal.signal(signal.SIGINT, previous)
