"""The training loop on real digits with real timm ViTs: resume is exact, divergence stops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from kdgqa.conversion.converter import convert
from kdgqa.models.timm_vit import create_timm_vit
from kdgqa.study.config import DataConfig, TrainConfig
from kdgqa.study.data import Augment, Batches, DataSplits, load_splits
from kdgqa.study.train import (
    TrainingDiverged,
    atomic_save,
    evaluate,
    load_checkpoint,
    lr_factor,
    train,
)


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    splits = load_splits(DataConfig(), seed=0)
    keep = torch.arange(256)
    return DataSplits("digits", splits.train.subset(keep), splits.val.subset(torch.arange(64)),
                      splits.test, splits.classes)


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_timm_vit(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=24,
                           depth=2, num_heads=6, mlp_ratio=2.0)


def _batches(splits: DataSplits) -> tuple[Batches, Batches]:
    aug = Augment(crop_padding=1, flip=True)
    return (Batches(splits.train, 32, image_size=8, augment=aug, seed=7),
            Batches(splits.val, 64, image_size=8, shuffle=False, drop_last=False))


def test_lr_schedules() -> None:
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "cosine") < 0.01
    assert lr_factor(99, 100, 0, "constant") == 1.0


def test_training_learns_digits(tmp_path: Path) -> None:
    splits = load_splits(DataConfig(), seed=0)
    torch.manual_seed(0)
    model = create_timm_vit(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=48,
                            depth=2, num_heads=6, mlp_ratio=2.0)
    tb = Batches(splits.train.subset(torch.arange(512)), 32, image_size=8, seed=7)
    vb = Batches(splits.val, 64, image_size=8, shuffle=False, drop_last=False)
    before = evaluate(model, vb)["acc"]
    recipe = TrainConfig(epochs=12, batch_size=32, lr=3e-3, schedule="cosine", warmup_steps=5)
    result = train(model, tb, vb, recipe, run_dir=tmp_path, progress=False)
    assert result.finished and result.steps == 12 * 16 and len(result.history) == 12
    assert result.best_val_acc > max(0.45, before + 0.3)  # chance is 0.1
    # The best validation weights are the ones left in the model.
    assert evaluate(model, vb)["acc"] == pytest.approx(result.best_val_acc)
    assert result.images_per_s > 0 and (tmp_path / "checkpoint.pt").is_file()


@pytest.mark.parametrize(("scheme", "options", "mixing"), [
    ("dgqa-diff", {"window_size": 3}, {}),  # DGQA buffers must be restored
    ("pgqa", {}, {}),  # global RNG (the noise) must be restored
    ("gqa", {}, {"mixup": 0.8, "cutmix": 1.0, "mix_prob": 0.7}),  # draws keyed by the step
])
def test_resume_continues_from_the_exact_step(
    digits: DataSplits, tmp_path: Path, scheme: str, options: dict, mixing: dict
) -> None:
    recipe = TrainConfig(epochs=3, batch_size=32, lr=1e-3, checkpoint_every=5,
                         allocation_every=2, **mixing)

    def fresh() -> nn.Module:
        return convert(_vit(), scheme, 2, **options)

    full_model = fresh()
    torch.manual_seed(11)
    full = train(full_model, *_batches(digits), recipe, run_dir=tmp_path / "a", progress=False)

    part_model = fresh()
    torch.manual_seed(11)
    stopped = train(part_model, *_batches(digits), recipe, run_dir=tmp_path / "b",
                    progress=False, max_steps=13)  # mid-epoch, between checkpoints of 5
    assert not stopped.finished and stopped.steps == 13
    torch.manual_seed(999)  # a different process state: everything must come from the file
    resumed_model = fresh()
    resumed = train(resumed_model, *_batches(digits), recipe, run_dir=tmp_path / "b",
                    resume=True, progress=False)
    assert resumed.steps == full.steps == 24
    assert resumed.history == full.history
    assert resumed.allocation == full.allocation
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key


class _PoisonAfter(nn.Module):
    """Wraps a model and returns NaN logits from the ``after``-th training call on."""

    def __init__(self, model: nn.Module, after: int) -> None:
        super().__init__()
        self.model, self.after, self.calls = model, after, 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                return out * math.nan
        return out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(digits: DataSplits, tmp_path: Path) -> None:
    model = _PoisonAfter(_vit(), after=7)
    recipe = TrainConfig(epochs=2, batch_size=32, lr=1e-3, checkpoint_every=3)
    with pytest.raises(TrainingDiverged, match="at step 7") as info:
        train(model, *_batches(digits), recipe, run_dir=tmp_path, progress=False)
    assert "last good checkpoint" in str(info.value)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["position"]["global_step"] == 6
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values()
               if v.is_floating_point())


def test_reading_losses_in_batches_changes_nothing_but_timing(
    digits: DataSplits, tmp_path: Path
) -> None:
    results = []
    for sync_every in (1, 5, 1000):
        model = _vit()
        recipe = TrainConfig(epochs=2, batch_size=32, lr=1e-3, sync_every=sync_every)
        torch.manual_seed(3)
        res = train(model, *_batches(digits), recipe, run_dir=tmp_path / str(sync_every),
                    progress=False)
        results.append((res.history, model.state_dict()))
    (history, state), *others = results
    for other_history, other_state in others:
        assert other_history == history
        assert all(torch.equal(v, other_state[k]) for k, v in state.items())


def test_divergence_found_late_is_still_never_saved(digits: DataSplits, tmp_path: Path) -> None:
    # Losses are read every 50 steps, but the checkpoint at step 9 reads them first.
    model = _PoisonAfter(_vit(), after=7)
    recipe = TrainConfig(epochs=2, batch_size=32, lr=1e-3, checkpoint_every=9, sync_every=50)
    with pytest.raises(TrainingDiverged, match="at step 7"):
        train(model, *_batches(digits), recipe, run_dir=tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_atomic_save_replaces_without_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    atomic_save({"a": 1}, path)
    atomic_save({"a": 2}, path)
    assert load_checkpoint(path)["a"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
