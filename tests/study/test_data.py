"""Datasets in their real layouts, deterministic splits, seeded resumable batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from kdgqa.study.config import DataConfig
from kdgqa.study.data import (
    Augment,
    Batches,
    DatasetError,
    ImageTensors,
    check_dataset,
    describe_splits,
    load_splits,
    plan_splits,
)


def _save(path: Path, value: int, size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, 0)).save(path)


def test_digits_splits_are_disjoint_deterministic_and_complete() -> None:
    a = load_splits(DataConfig(), seed=0)
    b = load_splits(DataConfig(), seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (1294, 144, 359)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.shape[1:] == (1, 8, 8) and a.num_classes == 10
    from sklearn.datasets import load_digits

    # Together the splits hold every digit exactly once (same multiset of label counts).
    labels = torch.cat([a.train.labels, a.val.labels, a.test.labels])
    assert torch.equal(labels.bincount(), torch.from_numpy(load_digits().target).bincount())
    c = load_splits(DataConfig(), seed=1)
    assert torch.equal(c.test.labels, load_splits(DataConfig(), seed=1).test.labels)
    assert not torch.equal(c.val.labels, a.val.labels)  # the val split follows the seed


def test_tiny_imagenet_layout_uses_val_annotations(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for label, wnid in enumerate(wnids):
        for i in range(5):
            _save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 40 + 150 * label)
    annotations = []
    for i, wnid in enumerate(["n02", "n01", "n02"]):
        _save(root / "val" / "images" / f"val_{i}.JPEG", 40 + 150 * wnids.index(wnid))
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t6\t6")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    splits = load_splits(DataConfig(name="tiny-imagenet", root=str(root), val_fraction=0.2,
                                    image_size=6))
    assert splits.classes == wnids and (len(splits.train), len(splits.val)) == (8, 2)
    assert splits.test.labels.tolist() == [1, 0, 1]
    # Labels follow the images: class 1 is the one with the larger red channel.
    red = splits.test.images[:, 0].float().mean((1, 2))
    assert bool((red[splits.test.labels == 1] > red[splits.test.labels == 0].max()).all())


def test_imagefolder_resizes_mixed_sizes_and_reads_test_folder(tmp_path: Path) -> None:
    for split, count in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(count):
                _save(tmp_path / split / cls / f"{i}.png", 10 * i, size=5 + i)
    splits = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8,
                                    val_fraction=0.25))
    assert splits.classes == ["cat", "dog"]
    assert splits.train.images.shape[1:] == (3, 8, 8) and len(splits.test) == 4


def _tree(root: Path, layout: dict[str, int]) -> None:
    for split, count in layout.items():
        for cls in ("cat", "dog"):
            for i in range(count):
                _save(root / split / cls / f"{i}.png", 10 * i)


@pytest.mark.parametrize(("layout", "test_from"), [
    ({"train": 9, "test": 2}, "/test"),
    ({"train": 9, "val": 3}, "/val"),
    ({"train": 9, "test": 2, "val": 3}, "/test; ROOT/val unused"),
    ({"train": 9}, "20% of the images, held out with seed 7922 from"),
    ({"": 7}, "20% of the images"),
])
@pytest.mark.parametrize("limit", [0, 11])
def test_split_plan_counts_what_loading_gives_and_names_each_source(tmp_path: Path, layout,
                                                                    test_from, limit) -> None:
    _tree(tmp_path, layout)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=6, limit_train=limit)
    plan = plan_splits(cfg, seed=3)
    splits = load_splits(cfg, seed=3)
    assert (plan.train, plan.val, plan.test) == (len(splits.train), len(splits.val),
                                                  len(splits.test))
    text = describe_splits(splits)
    assert f"test {len(splits.test)} (" in text and test_from in text
    assert "val " in text and "10% of the training images, held out with seed 3" in text


def test_split_plan_of_digits_and_tiny_imagenet_matches_loading(tmp_path: Path) -> None:
    for seed, fraction in ((0, 0.1), (5, 0.3)):
        cfg = DataConfig(val_fraction=fraction, limit_train=500 if seed else 0)
        plan, splits = plan_splits(cfg, seed), load_splits(cfg, seed)
        assert (plan.train, plan.val, plan.test) == (len(splits.train), len(splits.val),
                                                      len(splits.test))
    root = tmp_path / "tiny"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("n01\nn02\n")
    for w in ("n01", "n02"):
        for i in range(4):
            _save(root / "train" / w / "images" / f"{w}_{i}.JPEG", 9)
    _save(root / "val" / "images" / "v0.JPEG", 9)
    (root / "val" / "val_annotations.txt").write_text("v0.JPEG\tn02\t0\t0\t6\t6\n")
    cfg = DataConfig(name="tiny-imagenet", root=str(root), image_size=6, val_fraction=0.25)
    plan, splits = plan_splits(cfg), load_splits(cfg)
    assert (plan.train, plan.val, plan.test) == (6, 2, 1) == (
        len(splits.train), len(splits.val), len(splits.test))


@pytest.mark.parametrize(("name", "needle"), [
    ("imagefolder", "ROOT/train/<class>/<image>"),
    ("tiny-imagenet", "tiny-imagenet-200 layout"),
])
def test_missing_dataset_names_expected_layout(tmp_path: Path, name: str, needle: str) -> None:
    with pytest.raises(DatasetError, match="expected") as info:
        check_dataset(DataConfig(name=name, root=str(tmp_path / "missing")))
    assert needle in str(info.value)


def test_cifar_without_download_names_torchvision_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        check_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


def _data(n: int = 40) -> ImageTensors:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen)
    return ImageTensors(images, torch.arange(n) % 5)


def test_order_depends_only_on_seed_and_epoch() -> None:
    a = Batches(_data(), 8, image_size=8, seed=3)
    b = Batches(_data(), 8, image_size=8, seed=3)
    assert torch.equal(a.order(2), b.order(2)) and not torch.equal(a.order(2), a.order(3))
    assert len(a) == 5 and sorted(a.order(0).tolist()) == list(range(40))


def test_resuming_mid_epoch_replays_the_same_augmented_batches() -> None:
    aug = Augment(randaugment=True, randaugment_ops=2, magnitude=9, crop_padding=2, flip=True)
    batches = Batches(_data(), 8, image_size=12, augment=aug, seed=1)
    full = list(batches.epoch(4))
    tail = list(Batches(_data(), 8, image_size=12, augment=aug, seed=1).epoch(4, start_step=3))
    assert len(tail) == 2
    for (x1, y1), (x2, y2) in zip(full[3:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert full[0][0].shape == (8, 3, 12, 12)


def test_augmentation_is_per_image() -> None:
    images = torch.full((16, 3, 8, 8), 120, dtype=torch.uint8)
    images[:, :, :4] = 30  # identical images with an edge, so every op changes them
    same = ImageTensors(images, torch.zeros(16, dtype=torch.long))
    aug = Augment(randaugment=True, randaugment_ops=2, magnitude=15, crop_padding=1, flip=True)
    x, _ = next(Batches(same, 16, image_size=8, augment=aug, seed=0).epoch(0))
    distinct = {tuple(img.flatten().tolist()) for img in x}
    assert len(distinct) > 8
    assert float(x.min()) >= -1.0 - 1e-6 and float(x.max()) <= 1.0 + 1e-6


def test_two_ranks_see_exactly_the_single_process_batch() -> None:
    aug = Augment(randaugment=True, crop_padding=1, flip=True)
    one = list(Batches(_data(), 8, image_size=8, augment=aug, seed=5).epoch(1))
    ranks = [list(Batches(_data(), 8, image_size=8, augment=aug, seed=5, rank=r,
                          world_size=2).epoch(1)) for r in (0, 1)]
    for step, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), y)


def test_split_warnings_name_counts_and_the_threshold() -> None:
    from kdgqa.study.data import MIN_EVAL_IMAGES, split_warnings

    assert split_warnings(1000, MIN_EVAL_IMAGES, 500, {"uptrain": 64}) == []
    lines = split_warnings(10, 99, 4, {"uptrain": 64, "pretrain": 8})
    assert [line.split(":")[1].strip().split(" has")[0] for line in lines[:2]] == [
        "the validation split", "the test split"]
    assert "+-10" in lines[0] and "4 image(s)" in lines[1]
    assert lines[2] == ("warning: uptrain.batch_size 64 is larger than the 10 training images: "
                        "every epoch is a single step")
