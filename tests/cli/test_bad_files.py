"""Corrupted, truncated and foreign checkpoints and configs given to ``kdgqa.load``,
``kdgqa convert`` and ``kdgqa experiment --resume``: one line, exit status 2, nothing written.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import TINY_VIT, tiny_hf_config
from kdgqa.cli import main
from kdgqa.conversion.converter import convert
from kdgqa.errors import CheckpointError
from kdgqa.io.checkpoint import load, save_pretrained
from kdgqa.models.timm_vit import create_timm_vit
from kdgqa.study.config import parse_config
from kdgqa.study.experiment import run_experiment


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()  # drop what setting up the case printed
    status = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == 2 and out == "", (status, out, err)
    assert len(lines) == 1 and lines[0].startswith("kdgqa: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- kdgqa checkpoints

@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = convert(create_timm_vit(**TINY_VIT), "kdgqa", 3)
    save_pretrained(model, root / "single")
    save_pretrained(model, root / "sharded", max_shard_size="40KB")
    # A previous conversion that a failed `convert --overwrite` must leave alone.
    save_pretrained(convert(create_timm_vit(**TINY_VIT), "gqa", 2), root / "previous")
    return {"single": root / "single", "sharded": root / "sharded",
            "previous": root / "previous"}


CHECKPOINT_DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "weights truncated": ("single", lambda d: _truncate(d / "model.safetensors"), "checksum"),
    "weights bit flip": ("single", lambda d: _flip(d / "model.safetensors"), "checksum"),
    "weights missing": ("single", lambda d: (d / "model.safetensors").unlink(), "missing"),
    "config truncated": ("single", lambda d: _truncate(d / "kdgqa_config.json"), "cannot read"),
    "config tampered": ("single", lambda d: _edit_json(
        d / "kdgqa_config.json", lambda c: c["conversion"].update(scheme="gqa")), "checksum"),
    "config foreign": ("single", lambda d: (d / "kdgqa_config.json").write_text(
        '{"model_type": "vit"}'), "not a kdgqa config"),
    "config structure": ("single", lambda d: _edit_json(
        d / "kdgqa_config.json", lambda c: c.update(base=[1])), "malformed"),
    "config binary": ("single", lambda d: (d / "kdgqa_config.json").write_bytes(
        b"\xff\xfe\x00garbage"), "cannot read"),
    "checksums missing": ("single", lambda d: (d / "checksums.sha256").unlink(), "checksums"),
    "checksums binary": ("single", lambda d: (d / "checksums.sha256").write_bytes(
        bytes(range(256))), "checksums.sha256"),
    "shard missing": ("sharded", lambda d: next(d.glob("model-00002-*")).unlink(), "missing"),
    "index tampered": ("sharded", lambda d: (d / "model.safetensors.index.json").write_text(
        "[]"), "checksum"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_kdgqa_checkpoint_refused_by_load_and_convert(
    damage: str, saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    which, apply, expected = CHECKPOINT_DAMAGE[damage]
    source = tmp_path / "source"
    shutil.copytree(saved[which], source)
    apply(source)
    with pytest.raises(CheckpointError) as info:
        load(source)
    assert expected in str(info.value) and "\n" not in str(info.value)

    out = tmp_path / "out"
    shutil.copytree(saved["previous"], out)
    before_out, before_source = _snapshot(out), _snapshot(source)
    line = _one_line_exit_2(capsys, ["convert", "--model", str(source), "--scheme", "gqa",
                                     "--kv-heads", "3", "--out", str(out), "--overwrite"])
    assert expected in line
    assert _snapshot(out) == before_out and _snapshot(source) == before_source
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]  # no temp left


# --------------------------------------------------------------------------- foreign sources

class _Marker:
    """Unpickling this would create a file: proof that no code from the file ran."""

    path = ""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.path),))


def _timm_dir(root: Path) -> Path:
    torch.manual_seed(0)
    root.mkdir()
    save_file(create_timm_vit(**TINY_VIT).state_dict(), str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "model_args": TINY_VIT}))
    return root


def _hf_dir(root: Path) -> Path:
    from transformers import ViTModel

    ViTModel(tiny_hf_config(), add_pooling_layer=False).save_pretrained(str(root))
    return root


def _pt_file(root: Path, payload: object | bytes) -> Path:
    root.mkdir()
    path = root / "weights.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    return path


def _set_model_args(d: Path, **args: object) -> None:
    _edit_json(d / "config.json", lambda c: c["model_args"].update(args))


def _with(build: Callable[[Path], Path], edit: Callable[[Path], object]) -> Callable[[Path], Path]:
    """A source maker: ``build`` a valid source under the given root, then damage it."""
    def make(root: Path) -> Path:
        source = build(root)
        edit(source)
        return source

    return make


def _timm(edit: Callable[[Path], object]) -> Callable[[Path], Path]:
    return _with(_timm_dir, edit)


def _hf(edit: Callable[[Path], object]) -> Callable[[Path], Path]:
    return _with(_hf_dir, edit)


def _pt(payload: object | bytes, edit: Callable[[Path], object] = lambda p: None
        ) -> Callable[[Path], Path]:
    return _with(lambda root: _pt_file(root, payload), edit)


FOREIGN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "safetensors truncated": (_timm(lambda d: _truncate(d / "model.safetensors")),
                              "cannot read safetensors"),
    "safetensors empty": (_timm(lambda d: (d / "model.safetensors").write_bytes(b"")),
                          "cannot read safetensors"),
    "safetensors random": (_timm(lambda d: (d / "model.safetensors").write_bytes(
        os.urandom(4096))), "cannot read safetensors"),
    "timm config a list": (_timm(lambda d: (d / "config.json").write_text("[1]")),
                           "JSON object"),
    "timm config binary": (_timm(lambda d: (d / "config.json").write_bytes(b"\xff\x00\xfe")),
                           "cannot read"),
    "timm config wrong types": (_timm(lambda d: _edit_json(
        d / "config.json", lambda c: c.update(architecture=5))), "malformed"),
    "timm config zero heads": (_timm(lambda d: _set_model_args(d, num_heads=0)),
                               "cannot build timm model"),
    "timm config other shapes": (_timm(lambda d: _set_model_args(d, embed_dim=24, num_heads=3)),
                                 "do not fit"),
    "pt random bytes": (_pt(random.Random(0).randbytes(4096)), "not a PyTorch file"),
    # The unpickler fails somewhere in the garbage: refused or unreadable, one line either way.
    "pt pickle-like garbage": (_pt(b"\x80\x02" + random.Random(1).randbytes(4096)),
                               "weights.pt'"),
    "pt empty": (_pt(b""), "empty"),
    "pt truncated": (_pt({"w": torch.zeros(100)}, _truncate), "cannot read checkpoint"),
    "pt foreign pickle": (_pt(pickle.dumps({"a": [1, 2]})), "refusing"),
    "pt not a state dict": (_pt([torch.zeros(1)]), "state dict"),
    "hf weights truncated": (_hf(lambda d: _truncate(d / "model.safetensors")),
                             "cannot load Hugging Face model"),
    "hf config wrong type": (_hf(lambda d: _edit_json(
        d / "config.json", lambda c: c.update(hidden_size="x"))),
        "cannot load Hugging Face model"),
    "hf config other shapes": (_hf(lambda d: _edit_json(
        d / "config.json", lambda c: c.update(intermediate_size=64))),
        "do not match its config.json"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_foreign_or_corrupt_source_refused_by_convert(
    case: str, saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = FOREIGN[case]
    source = make(tmp_path / "source")
    out = tmp_path / "out"
    shutil.copytree(saved["previous"], out)
    before = _snapshot(out)
    line = _one_line_exit_2(capsys, ["convert", "--model", str(source), "--scheme", "gqa",
                                     "--kv-heads", "3", "--arch", "vit_tiny_patch16_224",
                                     "--out", str(out), "--overwrite"]
                            if source.suffix == ".pt" else
                            ["convert", "--model", str(source), "--scheme", "gqa",
                             "--kv-heads", "3", "--out", str(out), "--overwrite"])
    assert expected in line
    assert _snapshot(out) == before


def test_pickled_code_is_never_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    _Marker.path = str(marker)
    source = _pt_file(tmp_path / "source", {"w": torch.zeros(1), "x": _Marker()})
    line = _one_line_exit_2(capsys, ["convert", "--model", str(source), "--arch",
                                     "vit_tiny_patch16_224", "--scheme", "gqa", "--kv-heads",
                                     "3", "--out", str(tmp_path / "out")])
    assert "refusing" in line and not marker.exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- experiment --resume

STUDY = {
    "device": "cpu", "progress": False,
    "model": {"embed_dim": 12, "depth": 1, "num_heads": 3},
    "pretrain": {"epochs": 1, "batch_size": 128, "lr": 3e-3},
    "uptrain": {"epochs": 1, "batch_size": 128, "lr": 3e-3, "allocation_every": 2},
    "grid": {"schemes": ["kdgqa", "gqa"], "kv_heads": [1], "seeds": [0], "include_mha": False},
}
RUN = "kdgqa-g1-s0"  # the first grid run


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study") / "out"
    run_experiment(parse_config({**STUDY, "output_dir": str(out)}), log=None)
    return out


def _unfinish(out: Path) -> None:
    """As if the study died during the first grid run (its result not yet committed)."""
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(line for line in lines if RUN not in line))


def _truncated_best(out: Path) -> None:
    _unfinish(out)
    _truncate(out / "runs" / RUN / "best.pt")


def _foreign_checkpoint(out: Path) -> None:
    _unfinish(out)
    torch.save({"model": {}}, out / "runs" / RUN / "checkpoint.pt")


def _other_stored_config(out: Path) -> None:
    other = {**STUDY, "output_dir": str(out), "model": {"embed_dim": 24, "num_heads": 3}}
    (out / "config.yaml").write_text(yaml.safe_dump(other))


RESUME_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "pretrained weights flipped": (lambda o: _flip(o / "pretrain/model/model.safetensors"),
                                   "checksum mismatch"),
    "pretrained config truncated": (lambda o: _truncate(
        o / "pretrain/model/kdgqa_config.json"), "cannot read"),
    "results line damaged": (lambda o: (o / "results.jsonl").write_text(
        '{"run_id": "x"\n' + (o / "results.jsonl").read_text()), "line 1 is not a JSON"),
    "unfinished run best.pt truncated": (_truncated_best, "truncated"),
    "unfinished run foreign checkpoint": (_foreign_checkpoint, "not a kdgqa training"),
    "stored config of another study": (_other_stored_config, "different config (model.depth"),
    "stored config garbage": (lambda o: (o / "config.yaml").write_text("grid: [\n"),
                              "cannot read"),
    "resumed with another recipe": (lambda o: None, "different config (uptrain.lr: 0.003"),
    "resumed with a garbage config": (lambda o: None, "invalid YAML"),
}


@pytest.mark.parametrize("damage", list(RESUME_DAMAGE))
def test_resume_of_a_damaged_study_changes_nothing(
    damage: str, study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    apply, expected = RESUME_DAMAGE[damage]
    out = tmp_path / "out"
    shutil.copytree(study, out)
    apply(out)
    config = tmp_path / "study.yaml"
    recipe = {**STUDY["uptrain"], "lr": 0.01} if "recipe" in damage else STUDY["uptrain"]
    config.write_text(yaml.safe_dump({**STUDY, "uptrain": recipe, "output_dir": str(out)}))
    if damage == "resumed with a garbage config":
        config.write_bytes(config.read_bytes()[:40] + b"\n  - [\x07\n")
    before = _snapshot(out)
    line = _one_line_exit_2(capsys, ["experiment", str(config), "--resume"])
    assert expected in line
    assert _snapshot(out) == before
    assert _one_line_exit_2(capsys, ["experiment", str(config), "--resume", "--dry-run"]) == line


def test_resume_after_a_commit_torn_by_a_crash(study: Path, tmp_path: Path) -> None:
    """The study died while committing the first grid run: its allocation and history rows
    were appended, its result line only half written. Resuming redoes that run and every
    log ends with each run exactly once, equal to the uninterrupted study."""
    out = tmp_path / "out"
    shutil.copytree(study, out)
    _unfinish(out)
    with open(out / "results.jsonl", "a") as handle:
        handle.write('{"run_id": "kdgqa-g1-s0", "sch')  # no newline: torn
    run_experiment(parse_config({**STUDY, "output_dir": str(out)}), resume=True, log=None)
    def key(row: dict) -> tuple:
        return (row["run_id"], row.get("step"), row.get("layer"), row.get("epoch"))

    for name in ("results.jsonl", "allocation.jsonl", "history.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        reference = [json.loads(line) for line in (study / name).read_text().splitlines()]
        assert sorted(map(key, rows)) == sorted(map(key, reference)), name
    results = {r["run_id"]: r for r in map(json.loads, (out / "results.jsonl").open())}
    original = {r["run_id"]: r for r in map(json.loads, (study / "results.jsonl").open())}
    assert results[RUN]["test_acc"] == original[RUN]["test_acc"]
    assert results[RUN]["best_val_loss"] == original[RUN]["best_val_loss"]


def test_report_of_a_damaged_study(study: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(study, out)
    with open(out / "results.jsonl", "a") as handle:
        handle.write('{"run_id": "gqa-g1-s9", "test_a')  # torn by a crash: ignored
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "gqa-g1-s9" not in (out / "runs.csv").read_text()
    (out / "allocation.jsonl").write_text("{oops\n" + (out / "allocation.jsonl").read_text())
    before = _snapshot(out)
    line = _one_line_exit_2(capsys, ["report", str(out)])
    assert "allocation.jsonl' line 1 is not a JSON object" in line
    line = _one_line_exit_2(capsys, ["report", str(out), str(study), "-o",
                                     str(tmp_path / "merged")])
    assert "line 1" in line and not (tmp_path / "merged").exists()
    assert _snapshot(out) == before
