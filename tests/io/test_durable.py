"""Durable writes: permissions follow the umask, failures name the path the user gave."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kdgqa.errors import OutputError
from kdgqa.io.durable import atomic_write, replace_dir, write_new_dir


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_folders_and_files_follow_the_umask(tmp_path, umask_027):
    replace_dir(tmp_path / "out", lambda d: (d / "f.txt").write_text("x"))
    atomic_write(tmp_path / "file.json", [b"{}"])
    assert _mode(tmp_path / "out") == 0o750
    assert _mode(tmp_path / "out" / "f.txt") == 0o640
    assert _mode(tmp_path / "file.json") == 0o640


def test_a_write_that_cannot_happen_names_the_users_path_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=r"cannot write '.*/a-file/out': '.*/a-file' is not a directory$"):
        write_new_dir(blocker / "out", lambda d: None)
    with pytest.raises(OutputError, match=r"cannot write '.*/a-file/x\.json': '.*/a-file' is not a directory$"):
        atomic_write(blocker / "x.json", [b"{}"])

    def full_disk(folder: Path) -> None:
        (folder / "part").write_text("half")
        raise OutputError(folder / "model.safetensors", "No space left on device (os error 28)")

    with pytest.raises(OutputError) as info:
        replace_dir(tmp_path / "ckpt", full_disk)
    assert str(info.value) == (f"cannot write {str(tmp_path / 'ckpt')!r}: No space left on "
                               "device (os error 28)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_full_disk_while_saving_weights_is_one_line_naming_the_output(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    from kdgqa.io.weights import write_safetensors

    def no_space(*args: object, **kwargs: object) -> None:
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(OutputError, match=r"model\.safetensors': No space left on device"):
        write_safetensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")


def test_torch_advice_to_drop_weights_only_is_never_passed_on() -> None:
    from kdgqa.io.durable import torch_load_detail

    advice = RuntimeError("Weights only load failed. This file can still be loaded, to do so "
                          "you have two options...\n(1) set weights_only=False ...")
    assert "weights_only" not in torch_load_detail(advice)
    assert "was not loaded" in torch_load_detail(advice)
    assert torch_load_detail(ValueError("bad header\nmore")) == "bad header"


def test_a_directory_that_cannot_be_moved_aside_is_left_as_it_was(tmp_path, monkeypatch) -> None:
    """`--overwrite` onto a mount point: renaming it fails (EBUSY); nothing is left behind."""
    import errno
    from pathlib import Path

    from kdgqa.errors import OutputError
    from kdgqa.io.durable import write_new_dir

    out = tmp_path / "mnt"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    real_rename = Path.rename

    def rename(self: Path, target):  # type: ignore[no-untyped-def]
        if self == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OutputError, match="mnt"):
        write_new_dir(out, lambda d: (d / "new.txt").write_text("new"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]
    assert (out / "old.txt").read_text() == "keep"
