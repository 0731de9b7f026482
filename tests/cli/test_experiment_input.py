"""`kdgqa experiment` on input a user can get wrong: devices, aliases, foreign directories,
missing records, Ctrl-C. Each gets one line, a status, and no files written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdgqa.cli import main

FAST = ["--set", "pretrain.epochs=1", "--set", "uptrain.epochs=1", "--set", "grid.seeds=[0]",
        "--set", "grid.schemes=[gqa]", "--set", "grid.kv_heads=[2]", "--no-progress"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    err = capsys.readouterr().err
    return status, err


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize(("device", "expected"), [
    ("cuda", "torch sees no CUDA GPU on this machine"),
    ("cuda:1", "torch sees no CUDA GPU on this machine"),
    ("cuda:x", "device must be 'auto', 'cpu', 'cuda[:N]' or 'mps'"),
])
def test_a_device_this_machine_lacks_fails_up_front(device: str, expected: str, tmp_path: Path,
                                                    capsys) -> None:
    for extra in (["--dry-run"], []):
        status, err = _run(capsys, "experiment", "-o", str(tmp_path / "s"), "--device",
                           device, *extra, *FAST)
        assert status == 2 and expected in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "s").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks a machine without MPS")
def test_mps_without_mps_fails_up_front(tmp_path: Path, capsys) -> None:
    status, err = _run(capsys, "experiment", "-o", str(tmp_path / "s"), "--device", "mps",
                       "--dry-run")
    assert status == 2 and "MPS backend is not available" in err


def test_yaml_aliases_are_refused_at_once(tmp_path: Path, capsys) -> None:
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
             for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(bomb) + "\nname: *i\n")
    start = time.monotonic()
    status, err = _run(capsys, "experiment", str(config), "--dry-run")
    # Not a speed test: expanding the bomb would build 10^10 list items (hours and far more
    # memory than any machine has), so even a slow, shared machine stays far below this.
    assert time.monotonic() - start < 120
    assert status == 2 and "YAML aliases (*a) are not accepted" in err and str(config) in err
    status, err = _run(capsys, "experiment", "--dry-run", "--set", "name=&x [*x]")
    assert status == 2


def test_long_values_are_cut_in_messages(tmp_path: Path, capsys) -> None:
    status, err = _run(capsys, "experiment", "--dry-run", "--set",
                       "grid.kv_heads=[" + ", ".join(["99"] * 2000) + "]")
    assert status == 2 and "(cut at 600 characters)" in err and len(err) < 800


def test_resume_goes_only_into_a_study(tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = _listing(foreign)
    for extra in (["--dry-run"], []):
        status, err = _run(capsys, "experiment", "-o", str(foreign), "--resume", *extra, *FAST)
        assert status == 2 and "is not a kdgqa study" in err
        assert _listing(foreign) == before


def test_resume_without_the_config_record_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    assert _run(capsys, "experiment", "-o", str(out), *FAST)[0] == 0
    assert (out / "kdgqa-study.json").is_file()
    (out / "config.yaml").unlink()
    before = _listing(out)
    status, err = _run(capsys, "experiment", "-o", str(out), "--resume", *FAST,
                       "--set", "uptrain.lr=0.1")
    assert status == 2 and "config.yaml' is missing" in err
    assert _listing(out) == before


def _as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_is_one_line_and_status_130(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "kdgqa.cli", "experiment", "-o", str(tmp_path / "s"),
            "--no-progress", "--device", "cpu", "--set", "pretrain.epochs=1",
            "--set", "uptrain.epochs=30", "--set", "cpu_workers=2"]
    # Started as from a terminal: Ctrl-C neither ignored nor blocked. A test run launched in
    # the background of a non-interactive shell has SIGINT ignored, and that would be
    # inherited (and rightly respected: nohup-style launches ignore it on purpose).
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "s" / "meta.json").is_file():  # the grid is under way
                break
            time.sleep(0.5)
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == [
        "kdgqa: interrupted; finished runs are kept, continue with --resume"], err[-2000:]


def test_degenerate_splits_and_batches_are_warned_with_their_counts(tmp_path: Path,
                                                                    capsys) -> None:
    status = main(["experiment", "--dry-run", "-o", str(tmp_path / "s"),
                   "--set", "data.val_fraction=0.0001",
                   "--set", "data.test_fraction=0.0001", "--set", "uptrain.batch_size=100000"])
    out = capsys.readouterr().out
    assert status == 0
    assert "warning: the validation split has 1 image(s)" in out
    assert "warning: the test split has 1 image(s)" in out
    assert "uptrain.batch_size 100000 is larger than the 1795 training images" in out
    assert main(["experiment", "--dry-run", "-o", str(tmp_path / "s")]) == 0
    assert "warning" not in capsys.readouterr().out  # the default study is not degenerate


@pytest.mark.parametrize(("log", "damage"), [
    ("history.jsonl", b'{"run_id": "x"}\nnot json\n{"run_id": "y"}\n'),
    ("allocation.jsonl", bytes(range(256)) * 4 + b"\n"),
])
def test_resume_checks_every_log_before_writing(log: str, damage: bytes, tmp_path: Path,
                                                capsys) -> None:
    out = tmp_path / "s"
    assert main(["experiment", "-o", str(out), *FAST]) == 0
    (out / "results.jsonl").write_text("")  # every run to do again
    (out / log).write_bytes(damage)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    status, err = _run(capsys, "experiment", "-o", str(out), "--resume", *FAST)
    assert status == 2 and log in err and len(err.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_resume_clears_what_killed_writers_left(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    assert main(["experiment", "-o", str(out), *FAST]) == 0
    stale = out / "pretrain" / ".model.tmp-123-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (out / ".results.jsonl.tmp-99").write_text("{")
    assert main(["experiment", "-o", str(out), "--resume", *FAST]) == 0
    assert not stale.exists() and not (out / ".results.jsonl.tmp-99").exists()


def test_a_checkpoint_with_a_valid_digest_but_wrong_contents_is_refused_first(
        tmp_path: Path, capsys) -> None:
    from kdgqa.io.durable import save_checkpoint

    out = tmp_path / "s"
    assert main(["experiment", "-o", str(out), *FAST]) == 0
    rows = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # the last run unfinished
    last = out / "runs" / "gqa-g2-s0"
    save_checkpoint({"model": {}}, last / "checkpoint.pt")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    status, err = _run(capsys, "experiment", "-o", str(out), "--resume", *FAST)
    assert status == 2 and "is not a kdgqa training checkpoint" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_an_empty_training_split_is_refused_before_anything_is_written(tmp_path: Path,
                                                                       capsys) -> None:
    status, err = _run(capsys, "experiment", "-o", str(tmp_path / "s"), "--no-progress",
                       "--set", "data.limit_train=1")
    assert status == 2 and "data: the training split is empty" in err
    assert not (tmp_path / "s").exists()
