"""``kdgqa convert``: summary, output directory, one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_VIT
from kdgqa.cli import main
from kdgqa.io.checkpoint import load
from kdgqa.models.timm_vit import create_timm_vit


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_timm_vit(**TINY_VIT)
    path = tmp_path / "src" / "model.safetensors"
    path.parent.mkdir()
    save_file(model.state_dict(), str(path))
    (path.parent / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "model_args": TINY_VIT}))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_convert_prints_summary_and_writes_checkpoint(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    status, out, err = _run(capsys, "convert", "--model", str(checkpoint), "--scheme", "gqa",
                            "--kv-heads", "3", "--out", str(out_dir))
    assert status == 0 and err == ""
    # 2 layers x 2 x (6 - 3) heads x 8 rows x (48 + 1) parameters removed
    assert ("the file holds the grouped model: 67,013 -> 62,309 (-4,704) parameters; "
            "KV-cache bytes per token (float32, all layers) 768 -> 384") in out
    assert "blocks.1.attn: query heads per KV head [2, 2, 2]" in out
    assert load(out_dir).blocks[0].attn.num_kv_heads == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp left


def test_key_driven_scheme_and_mha_export(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(capsys, "convert", "--model", str(checkpoint), "--scheme", "kdgqa",
                          "--kv-heads", "4", "--out", str(tmp_path / "k"))
    assert status == 0 and "blocks.0.attn: dynamic" in out
    status, out, _ = _run(capsys, "convert", "--model", str(checkpoint), "--scheme", "mqa",
                          "--kv-heads", "1", "--out", str(tmp_path / "m"), "--format", "mha")
    assert status == 0 and (tmp_path / "m" / "config.json").is_file()
    # The export holds full MHA weights: the source's size, not the grouped model's.
    assert "the file holds a plain MHA model: 67,013 parameters, KV cache 768 bytes" in out
    assert "as a kdgqa model it would be 67,013 -> 59,173 (-7,840)" in out  # 2 x 2 x 5 x 8 x 49
    status, _, _ = _run(capsys, "convert", "--model", str(checkpoint), "--scheme", "dgqa-ema",
                        "--kv-heads", "2", "--option", "window_size=10",
                        "--out", str(tmp_path / "d"))
    assert status == 0
    assert load(tmp_path / "d").blocks[0].attn.allocator.options["window_size"] == 10


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--model", "timm:no_such_model_xyz"], "unknown timm model"),
        (["--model", "{tmp}/missing.safetensors"], "does not exist"),
        (["--model", "{ckpt}", "--kv-heads", "4"], "divisible"),
        (["--model", "{ckpt}", "--kv-heads", "9"], "num_kv_heads"),
        (["--model", "{ckpt}", "--scheme", "fancy"], "unknown scheme"),
        (["--model", "{wrong}"], "do not fit"),
        (["--model", "{ckpt}", "--kv-heads", "two"], "invalid int"),
    ],
)
def test_bad_input_one_line_exit_2_no_output(
    argv: list[str], match: str, checkpoint: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    wrong = tmp_path / "wrong" / "model.safetensors"
    wrong.parent.mkdir()
    save_file(create_timm_vit(**{**TINY_VIT, "embed_dim": 24, "num_heads": 3}).state_dict(),
              str(wrong))
    (wrong.parent / "config.json").write_text((checkpoint.parent / "config.json").read_text())
    subs = {"{tmp}": str(tmp_path), "{ckpt}": str(checkpoint), "{wrong}": str(wrong)}
    argv = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in argv]
    full = ["convert", "--scheme", "gqa", "--kv-heads", "3", "--out", str(tmp_path / "out")]
    status, out, err = _run(capsys, *full, *argv)
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdgqa: error: ") and match in lines[0]
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_existing_output_unchanged(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    base = ["convert", "--model", str(checkpoint), "--scheme", "gqa", "--out", str(out_dir)]
    status, _, err = _run(capsys, *base, "--kv-heads", "3")
    assert status == 2 and "exists" in err
    status, _, _ = _run(capsys, *base, "--kv-heads", "5", "--overwrite")
    assert status == 2 and (out_dir / "keep.txt").read_text() == "mine"
    status, _, _ = _run(capsys, *base, "--kv-heads", "3", "--overwrite")
    assert status == 0 and not (out_dir / "keep.txt").exists()
    assert (out_dir / "kdgqa_config.json").is_file()


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, "convert")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "required" in err
    status, _, err = _run(capsys, "frobnicate")
    assert status == 2 and err.startswith("kdgqa: error: ")


def test_own_image_folder_dry_run_names_every_split(tmp_path: Path, capsys) -> None:
    from PIL import Image

    root = tmp_path / "images"
    for split, count in (("train", 10), ("val", 3)):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(root / split / cls / f"{i}.png")
    example = Path(__file__).parents[2] / "configs" / "imagefolder-example.yaml"
    status, out, err = _run(capsys, "experiment", str(example), "--set", f"data.root={root}",
                            "-o", str(tmp_path / "run"), "--dry-run")
    assert status == 0, err
    assert (f"data: imagefolder: train 18 ({root / 'train'}), val 2 (10% of the training "
            f"images, held out with seed 0), test 6 ({root / 'val'})") in out
    assert not (tmp_path / "run").exists()
