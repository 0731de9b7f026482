"""SIGKILL a real training process at random steps and inside checkpoint writes, resume, and
end bitwise where an uninterrupted run ends; no corrupt file ever sits under a final name.

The kill points come from a seeded generator (``KDGQA_CRASH_SEED``, default 5) so a failure
replays; set another seed to explore other points.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import crash_child
import pytest
import torch

from kdgqa.io.durable import CorruptFileError, load_checkpoint, save_checkpoint, verify_checkpoint
from kdgqa.study.train import BEST, CHECKPOINT

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
SEED = int(os.environ.get("KDGQA_CRASH_SEED", "5"))


def _child(run_dir: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(HERE / "crash_child.py"), str(run_dir), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_files_are_intact(run_dir: Path) -> None:
    for name in (CHECKPOINT, BEST):
        if (run_dir / name).exists():
            verify_checkpoint(run_dir / name)  # raises on a torn or corrupt file


def _in_process(run_dir: Path, resume: bool):  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    try:
        return crash_child.run(run_dir, resume)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_anywhere_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    # 18 steps (3 epochs x 6); writes: ckpt@5, best@6, ckpt@10, best@12, ckpt@15, best@18,
    # ckpt@18. Each process below dies at its point; the next one resumes from the files.
    plan = [
        # between best.pt@6 and checkpoint.pt@10: best.pt is newer than the checkpoint
        ("step", f"step:{rng.randint(7, 9)}"),
        ("write", f"write:1:{rng.uniform(0.05, 0.95):.3f}"),  # a torn temp file
        ("before-rename", "before-rename:2"),  # a complete temp file, never renamed
        ("external", None),  # SIGKILL from outside at a random moment (maybe mid-save)
    ]
    log = []
    for index, (kind, kill) in enumerate(plan):
        args = ["--resume"] if index else []
        if kill is not None:
            args += ["--kill", kill]
        proc = _child(run_dir, *args)
        if kind == "external":
            time.sleep(rng.uniform(2.0, 5.0))  # start-up takes about 3 s of it
            proc.send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
        log.append(f"{kind} {kill}: rc {proc.returncode}")
        if kind != "external":  # the external kill may land after the run finished
            assert proc.returncode == -signal.SIGKILL, (log, output[-3000:])
        _final_files_are_intact(run_dir)
        if kind == "write":
            torn = list(run_dir.glob(".*.tmp-*"))
            assert torn, "the kill inside a write left no temp file: the point was not hit"

    model, result = _in_process(run_dir, resume=True)
    assert not list(run_dir.glob(".*.tmp-*")), "stale temp files were not cleaned up"
    ref_model, ref = _in_process(tmp_path / "reference", resume=False)

    assert result.steps == ref.steps == 18, log
    assert result.history == ref.history, log
    assert result.allocation == ref.allocation, log
    assert (result.best_val_acc, result.best_val_loss, result.best_step) == (
        ref.best_val_acc, ref.best_val_loss, ref.best_step), log
    state, ref_state = model.state_dict(), ref_model.state_dict()
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(state[key], value), (key, log)
    best = load_checkpoint(run_dir / BEST)
    assert all(torch.equal(best[k], v) for k, v in
               load_checkpoint(tmp_path / "reference" / BEST).items())


@pytest.mark.parametrize("damage", ["truncate", "flip", "pad", "header", "foreign", "empty"])
def test_damaged_checkpoint_is_refused_in_one_line(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"w": torch.arange(1000.0)}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "pad":
        data += b"\0" * 16
    elif damage == "header":
        data[20:30] = b"x" * 10
    elif damage == "foreign":
        torch.save({"w": 1}, path)
        data = bytearray(path.read_bytes())
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert any(word in message for word in ("corrupt", "foreign", "truncated")), message


def test_resume_refuses_a_checkpoint_of_another_recipe(tmp_path: Path) -> None:
    from kdgqa.models.timm_vit import create_timm_vit
    from kdgqa.study.config import DataConfig, TrainConfig
    from kdgqa.study.data import Batches, load_splits
    from kdgqa.study.train import train

    splits = load_splits(DataConfig(), seed=0)
    batches = Batches(splits.train.subset(torch.arange(64)), 32, image_size=8)
    model = create_timm_vit(img_size=8, patch_size=2, in_chans=1, num_classes=10,
                            embed_dim=12, depth=1, num_heads=3)
    train(model, batches, None, TrainConfig(epochs=1, lr=1e-3), run_dir=tmp_path,
          progress=False)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(CorruptFileError, match=re.escape("different training recipe (lr: 0.001, now 0.01)")):
        train(model, batches, None, TrainConfig(epochs=1, lr=1e-2), run_dir=tmp_path,
              resume=True, progress=False)
    other = create_timm_vit(img_size=8, patch_size=2, in_chans=1, num_classes=10,
                            embed_dim=12, depth=2, num_heads=3)
    with pytest.raises(CorruptFileError, match="does not fit this run"):
        train(other, batches, None, TrainConfig(epochs=1, lr=1e-3), run_dir=tmp_path,
              resume=True, progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


STUDY = {
    "device": "cpu", "progress": False,
    "model": {"embed_dim": 12, "depth": 1, "num_heads": 3},
    "pretrain": {"epochs": 2, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 4},
    "uptrain": {"epochs": 2, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 3,
                "allocation_every": 2},
    "grid": {"schemes": ["kdgqa", "dgqa-diff"], "kv_heads": [2], "seeds": [0],
             "include_mha": False, "scheme_options": {"dgqa-diff": {"window_size": 2}}},
}
#: Fields of a result row that measure the machine, not the model.
TIMING = ("train_img_per_s", "train_seconds")


def _rows(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sigkilled_study_resumes_to_the_same_results(tmp_path: Path) -> None:
    import yaml

    from kdgqa.study.config import parse_config
    from kdgqa.study.experiment import run_experiment

    rng = random.Random(SEED)
    out = tmp_path / "killed"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({**STUDY, "output_dir": str(out)}))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "kdgqa.cli", "experiment", str(config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (out / "config.yaml").exists() and proc.poll() is None:  # data loaded
        assert time.monotonic() < deadline
        time.sleep(0.01)
    delay = rng.uniform(0.0, 3.0)  # the study itself takes about 3 s here
    time.sleep(delay)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]

    run_experiment(parse_config({**STUDY, "output_dir": str(out)}), resume=True, log=None)
    reference = tmp_path / "reference"
    run_experiment(parse_config({**STUDY, "output_dir": str(reference)}), log=None)

    for name in ("results.jsonl", "allocation.jsonl", "history.jsonl"):
        rows, ref = _rows(out / name), _rows(reference / name)
        for row in (*rows, *ref):
            for key in TIMING:
                row.pop(key, None)
        assert rows == ref, (name, f"killed {delay:.2f} s after start-up")
    assert not list(out.rglob(".*.tmp-*")) or proc.returncode == 0


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    import numpy as np

    from kdgqa.study.train import _rng_state, _set_rng_state

    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in the numpy state
    save_checkpoint({"rng": _rng_state()}, tmp_path / "rng.pt")
    before = (np.random.rand(3), random.random(), torch.rand(2))
    _set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    after = (np.random.rand(3), random.random(), torch.rand(2))
    assert np.array_equal(before[0], after[0]) and before[1] == after[1]
    assert torch.equal(before[2], after[2])


def test_replace_dir_is_all_or_nothing(tmp_path: Path) -> None:
    from kdgqa.io.durable import replace_dir

    out = tmp_path / "model"
    replace_dir(out, lambda d: (d / "a").write_text("old"))

    def fail_half_way(d: Path) -> None:
        (d / "a").write_text("new")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        replace_dir(out, fail_half_way)
    assert (out / "a").read_text() == "old"
    (tmp_path / ".model.tmp-left-by-a-kill").mkdir()  # what a SIGKILL would leave
    replace_dir(out, lambda d: (d / "b").write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in out.iterdir()] == ["b"]


def test_jsonl_log_survives_a_torn_append(tmp_path: Path) -> None:
    from kdgqa.io.durable import append_jsonl, read_jsonl

    log = tmp_path / "results.jsonl"
    append_jsonl(log, [{"run_id": "a", "x": 1}])
    with open(log, "a") as handle:
        handle.write('{"run_id": "b", "x"')  # a crash in the middle of a line
    assert read_jsonl(log) == [{"run_id": "a", "x": 1}]
    append_jsonl(log, [{"run_id": "b", "x": 2}])
    assert read_jsonl(log) == [{"run_id": "a", "x": 1}, {"run_id": "b", "x": 2}]
    append_jsonl(log, [{"run_id": "a", "x": 3}])  # a redone run replaces its old rows
    assert read_jsonl(log) == [{"run_id": "b", "x": 2}, {"run_id": "a", "x": 3}]
    log.write_text(log.read_text() + "garbage\n")
    with pytest.raises(CorruptFileError, match="line 3 is not a JSON object"):
        read_jsonl(log)
