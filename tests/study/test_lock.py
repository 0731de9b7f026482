"""One writer per study directory: a live holder refuses, a dead one's lock is taken over."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kdgqa.errors import ConfigError
from kdgqa.study.lock import LOCK_NAME, study_lock


def _holder() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_live_writer_keeps_the_directory(tmp_path: Path) -> None:
    proc = _holder()
    try:
        (tmp_path / LOCK_NAME).write_text(f"{socket.gethostname()} {proc.pid}")
        expected = rf"another kdgqa experiment \(process {proc.pid}"
        with pytest.raises(ConfigError, match=expected), study_lock(tmp_path):
            pass
        assert (tmp_path / LOCK_NAME).read_text().endswith(str(proc.pid))
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_writers_lock_is_taken_over_and_released(tmp_path: Path) -> None:
    proc = _holder()
    proc.kill()
    proc.wait()
    (tmp_path / LOCK_NAME).write_text(f"{socket.gethostname()} {proc.pid}")
    with study_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().split()[1] != str(proc.pid)
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_directory_made_for_nothing_is_removed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), study_lock(tmp_path / "new"):
        raise RuntimeError("failed before writing")
    assert not (tmp_path / "new").exists()


def test_the_experiment_refuses_a_second_writer(tmp_path: Path, capsys) -> None:
    from kdgqa.cli import main

    out = tmp_path / "s"
    out.mkdir()
    proc = _holder()
    try:
        (out / LOCK_NAME).write_text(f"{socket.gethostname()} {proc.pid}")
        status = main(["experiment", "-o", str(out), "--resume", "--no-progress",
                       "--set", "pretrain.epochs=1"])
        err = capsys.readouterr().err
        assert status == 2 and "is being written by another kdgqa experiment" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        proc.kill()
        proc.wait()
