"""Calibration images for calibrated conversions, taken from the project's own datasets.

Two sources, both training images only (never a split a study evaluates on): the first images
of a study's training split, prepared exactly as training batches but without augmentation
(:func:`calibration_arguments`, used by the experiment grid), and a dataset named on the
command line (:func:`load_calibration`, used by ``kdgqa convert --calibration``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdgqa.conversion.converter import convert
from kdgqa.conversion.distill import DISTILL_IMAGES, distill_layers
from kdgqa.conversion.options import DATA_POOLING, FIT_CALIBRATION_IMAGES
from kdgqa.errors import DatasetError
from kdgqa.schemes.registry import SCHEMES
from kdgqa.study.config import DATASETS, DataConfig, resolve_conversion, resolve_scheme
from kdgqa.study.data import Batches, check_dataset, load_splits

__all__ = [
    "calibration_arguments",
    "check_calibration",
    "convert_grid_cell",
    "dataset_config",
    "load_calibration",
    "training_images",
]

#: Images per prepared batch.
BATCH_SIZE = 64


def training_images(data: Any, cfg: Any, count: int,
                    batch_size: int = BATCH_SIZE) -> Iterator[Tensor]:
    """The first ``count`` images of ``data`` (``kdgqa.study.data.ImageTensors``), prepared exactly
    as ``kdgqa.study.data.Batches`` prepares training batches for ``cfg`` (a ``DataConfig``:
    size, mean, std) but without augmentation. Deterministic."""
    batches = Batches(data, batch_size, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std,
                      shuffle=False, drop_last=False)
    total = min(count, len(data))
    for start in range(0, total, batch_size):
        yield batches.prepare(torch.arange(start, min(total, start + batch_size)))


def calibration_arguments(
    scheme: str, options: Mapping[str, Any], data: Any, cfg: Any, data_pooling: bool = False
) -> dict[str, Any]:
    """``{"calibration": ...}`` for :func:`kdgqa.convert` when ``scheme`` needs it, or the
    pooling does (``data_pooling``: ``fit``, ``align``): the first ``calibration_images``
    training images (see :func:`training_images`); else ``{}``."""
    cls = SCHEMES.get(scheme)
    needs = cls is not None and cls.needs_calibration
    if not needs and not data_pooling:
        return {}
    default = cls.option_defaults["calibration_images"] if needs and cls else (
        FIT_CALIBRATION_IMAGES)
    count = options.get("calibration_images", default)
    return {"calibration": training_images(data, cfg, int(count))}


def dataset_config(spec: str, image_size: int, count: int, what: str = "calibration") -> Any:
    """A ``DataConfig`` for ``spec`` (``NAME:ROOT``, ``NAME`` or an image folder) that decodes
    only enough training images to leave ``count`` in the training split; its test split is
    whole. Raises ``kdgqa.errors.DatasetError`` with one line."""
    name, sep, root = spec.partition(":")
    if sep and name in DATASETS:
        cfg_root: str | None = root or None
    elif not sep and spec in DATASETS:
        name, cfg_root = spec, None
    elif Path(spec).is_dir():
        name, cfg_root = "imagefolder", spec
    else:
        raise DatasetError(
            f"{what} {spec!r} is neither NAME:ROOT (NAME one of "
            f"{', '.join(DATASETS)}) nor an image folder"
        )
    if name == "imagefolder" and cfg_root is None:
        raise DatasetError(f"{what} imagefolder needs a root: imagefolder:PATH or PATH")
    # Loaders may hold out a test share and always a validation share of the training
    # images; ask for enough that the training split alone still has ``count``.
    cfg = DataConfig(name=name, root=cfg_root, image_size=image_size)
    keep = (1.0 - cfg.test_fraction) * (1.0 - cfg.val_fraction)
    cfg.limit_train = math.ceil(count / keep) + 2
    return cfg


def check_calibration(spec: str) -> None:
    """Cheap check (no decoding) that ``spec`` names a dataset that is there; raises
    ``kdgqa.errors.DatasetError`` with one line."""
    check_dataset(dataset_config(spec, 8, 1))


def load_calibration(
    spec: str,
    count: int,
    *,
    image_size: int,
    channels: int,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
) -> Tensor:
    """Calibration images from a dataset the project can load, ready for a model.

    ``spec`` is ``NAME:ROOT`` (``imagefolder``, ``tiny-imagenet``, ``cifar10``, ``cifar100``,
    ``food101``; ``digits`` needs no root) or a path to an image folder. Returns the first
    ``count`` images of the training split (a fixed, seeded selection, never test images)
    resized to ``image_size``, scaled
    to [0, 1] and normalised with per-channel (or scalar) ``mean``/``std``, float32
    ``(n, C, H, W)``. Raises ``kdgqa.errors.DatasetError`` (a ``ValueError``) with one line.
    """
    cfg = dataset_config(spec, image_size, count)
    check_dataset(cfg)
    splits = load_splits(cfg)
    images = splits.train.images[:count]  # never the test split a study evaluates on
    if images.shape[0] == 0:
        raise DatasetError(f"calibration {spec!r} holds no images")
    if images.shape[1] != channels:
        raise DatasetError(f"calibration {spec!r} has {images.shape[1]}-channel images; the "
                           f"model expects {channels} channels")
    x = images.float().div_(255.0)
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=image_size < x.shape[-1]).clamp_(0, 1)
    m = torch.tensor([float(v) for v in mean]).view(-1, 1, 1)
    s = torch.tensor([float(v) for v in std]).view(-1, 1, 1)
    if m.shape[0] not in (1, channels) or s.shape[0] not in (1, channels):
        raise DatasetError(f"calibration mean/std need 1 or {channels} values, got "
                           f"{list(mean)} / {list(std)}")
    if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(s).all())
            and bool((s > 0).all())):
        raise DatasetError(f"calibration mean/std must be finite with std > 0, got "
                           f"{list(mean)} / {list(std)}")
    return (x - m) / s


def convert_grid_cell(model: Any, base: Any, grid: Any, label: str, kv_heads: int,
                      train: Callable[[], Any], cfg: Any, seed: int) -> None:
    """Convert ``model`` (a copy of the MHA model ``base``) to the grid cell ``label`` at
    ``kv_heads`` as a study does: its scheme and options, pooling and alignment, calibration
    on the first training images (``train()``, read only when the cell needs them) and, with
    ``distill_steps``, layer-wise distillation towards ``base`` seeded by ``seed``."""
    scheme, options = resolve_scheme(grid, label)
    conversion = resolve_conversion(grid, label)
    steps = conversion.pop("distill_steps")
    data_pooling = conversion["align"] or conversion["pooling"] in DATA_POOLING
    cls = SCHEMES.get(scheme)
    extra: dict[str, Any] = {}
    data = None
    if (cls is not None and cls.needs_calibration) or data_pooling or steps:
        data = train()
        extra = calibration_arguments(scheme, options, data, cfg, data_pooling=data_pooling)
    convert(model, scheme, kv_heads, **conversion, **options, **extra)
    if steps:
        distill_layers(model, base, training_images(data, cfg, DISTILL_IMAGES), steps=steps,
                       seed=seed)
