"""A really full disk (a small tmpfs, mounted where the machine allows it): one line, status
2, nothing half-written."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdgqa.cli import main
from kdgqa.io.checkpoint import save_pretrained
from kdgqa.models.timm_vit import create_timm_vit


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no mount command, or it hangs
        pytest.skip("cannot mount a tmpfs here (no usable mount command)")
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_convert_onto_a_full_disk(small_disk: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "vit"
    save_pretrained(create_timm_vit(img_size=32, patch_size=8, embed_dim=96, depth=4,
                                    num_heads=6, num_classes=5), source)  # about 1.8 MB
    status = main(["convert", "--model", str(source), "--scheme", "gqa", "--kv-heads", "2",
                   "--out", str(small_disk / "out")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "No space left on device" in err and str(small_disk / "out") in err
    assert list(small_disk.iterdir()) == []


def test_experiment_onto_a_full_disk(small_disk: Path, capsys) -> None:
    status = main(["experiment", "-o", str(small_disk / "s"), "--no-progress", "--set",
                   "pretrain.epochs=1", "--set", "grid.seeds=[0]", "--set", "grid.kv_heads=[2]",
                   "--set", "grid.schemes=[gqa]"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and f"cannot write '{small_disk / 's'}" in err
    # What was written is whole: no temp file survives, and the study resumes elsewhere.
    assert not [p for p in small_disk.rglob(".*.tmp-*")]
