"""Image datasets decoded once into tensors, augmented on the tensors' device.

Every supported source (scikit-learn's digits, CIFAR-10/100 and Food-101 through torchvision,
Tiny ImageNet in its ``tiny-imagenet-200`` layout, any ``ImageFolder`` tree) becomes the same
thing: uint8 image tensors plus labels, split into train / validation / test. The validation
split is held out of the training data with a fixed seed, so it picks checkpoints without ever
touching the test split. ``Batches`` then serves a seeded, resumable order (epoch + step) and
applies resizing, crop, flip and RandAugment on whatever device the images live on, with
per-image randomness drawn from a generator keyed by (seed, epoch, step): a resumed run sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kdgqa.errors import DatasetError
from kdgqa.study.config import DataConfig
from kdgqa.study.splits import SplitOrigins, SplitPlan

__all__ = [
    "Augment",
    "Batches",
    "DataSplits",
    "DatasetError",
    "ImageTensors",
    "SplitOrigins",
    "SplitPlan",
    "check_dataset",
    "describe_splits",
    "load_splits",
    "plan_splits",
    "split_origins",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class ImageTensors:
    """Decoded images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError("labels must be (N,) matching the images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> ImageTensors:
        return ImageTensors(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> ImageTensors:
        return ImageTensors(self.images.to(device), self.labels.to(device))


@dataclass
class DataSplits:
    """Train / validation / test splits of one dataset and what a model needs to know."""

    name: str
    train: ImageTensors
    val: ImageTensors
    test: ImageTensors
    classes: list[str]
    #: Where each split comes from, in words (see :func:`plan_splits`).
    origins: SplitOrigins | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    def to(self, device: torch.device | str) -> DataSplits:
        return DataSplits(self.name, self.train.to(device), self.val.to(device),
                          self.test.to(device), self.classes, self.origins)


# --------------------------------------------------------------------------- sources

def _split_off(data: ImageTensors, fraction: float, seed: int) -> tuple[ImageTensors, ImageTensors]:
    """Hold out ``fraction`` of ``data`` with a fixed seed: (kept, held_out)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data), generator=gen)
    held = max(1, round(len(data) * fraction))
    return data.subset(perm[held:].sort().values), data.subset(perm[:held].sort().values)


def _digits(cfg: DataConfig, seed: int) -> tuple[ImageTensors, ImageTensors, list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 grey levels -> 0..255.
    images = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().to(torch.uint8)
    data = ImageTensors(images.unsqueeze(1).contiguous(), torch.from_numpy(bunch.target).long())
    train, test = _split_off(data, cfg.test_fraction, seed + 7919)
    return train, test, [str(c) for c in range(10)]


def _decode_files(paths: list[Path], size: int | None, channels: int) -> Tensor:
    """Decode image files to one uint8 tensor; resize to ``size`` when given (sizes differ)."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"

    def one(path: Path) -> Tensor:
        with Image.open(path) as img:
            img = img.convert(mode)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            return t.view(img.size[1], img.size[0], channels).permute(2, 0, 1)

    if not paths:
        return torch.empty(0, channels, size or 1, size or 1, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        tensors = list(pool.map(one, paths, chunksize=256))
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise DatasetError(f"images have different sizes {sorted(shapes)[:3]}...; "
                           "internal error: a common size should have been chosen")
    return torch.stack(tensors)


def _common_size(paths: list[Path], image_size: int) -> int | None:
    """``None`` (keep native size) when a sample of headers shows one square size, else
    ``image_size`` so that varying images become one tensor."""
    from PIL import Image

    sizes = set()
    step = max(1, len(paths) // 64)
    for path in paths[::step]:
        with Image.open(path) as img:
            sizes.add(img.size)
    if len(sizes) == 1:
        (w, h), = sizes
        if w == h:
            return None
    return image_size


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _class_tree(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        files = _images_in(folder / name)
        paths += files
        labels += [index] * len(files)
    return paths, labels, classes


def _load_paths(paths: list[Path], labels: list[int], cfg: DataConfig, size: int | None,
                channels: int = 3) -> ImageTensors:
    images = _decode_files(paths, size, channels)
    return ImageTensors(images, torch.tensor(labels, dtype=torch.long))


def _imagefolder(cfg: DataConfig, seed: int) -> tuple[ImageTensors, ImageTensors, list[str]]:
    root = Path(cfg.root or "")
    _check_imagefolder(root)
    train_dir, test_dir = _imagefolder_dirs(root)
    paths, labels, classes = _class_tree(train_dir)
    paths, labels = _limit(paths, labels, cfg.limit_train, seed)
    size = _common_size(paths, cfg.image_size)
    train = _load_paths(paths, labels, cfg, size)
    if test_dir is None:
        train, test = _split_off(train, cfg.test_fraction, seed + 7919)
        return train, test, classes
    t_paths, t_labels, t_classes = _class_tree(test_dir)
    if t_classes != classes:
        raise DatasetError(f"{test_dir} has classes {t_classes[:5]}... but {train_dir} has "
                           f"{classes[:5]}...; expected the same class folders in both")
    test = _load_paths(t_paths, t_labels, cfg, size if size is not None
                       else _common_size(t_paths, cfg.image_size))
    if test.images.shape[2:] != train.images.shape[2:]:
        test = ImageTensors(_resize_uint8(test.images, train.images.shape[-1]), test.labels)
    return train, test, classes


def _limit(paths: list[Path], labels: list[int], limit: int, seed: int
           ) -> tuple[list[Path], list[int]]:
    if not limit or limit >= len(paths):
        return paths, labels
    perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))
    keep: list[int] = perm[:limit].sort().values.tolist()
    return [paths[i] for i in keep], [labels[i] for i in keep]


def _tiny_imagenet(cfg: DataConfig, seed: int) -> tuple[ImageTensors, ImageTensors, list[str]]:
    root = Path(cfg.root or "")
    _check_tiny_imagenet(root)
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    for wnid in wnids:
        files = _images_in(root / "train" / wnid / "images")
        paths += files
        labels += [index[wnid]] * len(files)
    paths, labels = _limit(paths, labels, cfg.limit_train, seed)
    size = _common_size(paths, cfg.image_size)
    train = _load_paths(paths, labels, cfg, size)
    v_paths, v_labels = [], []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in index:
            v_paths.append(root / "val" / "images" / parts[0])
            v_labels.append(index[parts[1]])
    test = _load_paths(v_paths, v_labels, cfg, size)
    return train, test, wnids


def _torchvision(cfg: DataConfig, seed: int) -> tuple[ImageTensors, ImageTensors, list[str]]:
    import numpy as np
    from torchvision import datasets

    root = cfg.root or os.path.join(os.path.expanduser("~"), ".cache", "kdgqa", cfg.name)
    if cfg.name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
        folder = "cifar-10-batches-py" if cfg.name == "cifar10" else "cifar-100-python"
        if not cfg.download and not (Path(root) / folder).is_dir():
            raise DatasetError(
                f"{cfg.name} not found: expected torchvision's layout {root}/{folder}/ "
                "(set data.download: true when online, or use data.name: imagefolder for a "
                "train/<class>/ tree)")
        parts = []
        for train in (True, False):
            ds = cls(root, train=train, download=cfg.download)
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
            parts.append(ImageTensors(images.contiguous(), torch.tensor(ds.targets)))
        return parts[0], parts[1], list(ds.classes)
    if not cfg.download and not (Path(root) / "food-101" / "images").is_dir():
        raise DatasetError(f"food101 not found: expected torchvision's layout "
                           f"{root}/food-101/{{images,meta}}/ "
                           "(set data.download: true when online)")
    splits = []
    for split in ("train", "test"):
        ds = datasets.Food101(root, split=split, download=cfg.download)
        paths = [Path(p) for p in ds._image_files]
        labels = list(ds._labels)
        if split == "train":
            paths, labels = _limit(paths, labels, cfg.limit_train, seed)
        splits.append(_load_paths(paths, labels, cfg, cfg.image_size))
    return splits[0], splits[1], list(ds.classes)


def _check_imagefolder(root: Path) -> None:
    train_dir = root / "train" if (root / "train").is_dir() else root
    if not root.is_dir() or not any(p.is_dir() for p in train_dir.iterdir()):
        raise DatasetError(
            f"image folder {str(root)!r} not found or empty: expected "
            "ROOT/train/<class>/<image> (and optionally ROOT/test/<class>/<image>) "
            "or ROOT/<class>/<image>")


def _check_tiny_imagenet(root: Path) -> None:
    needed = ["wnids.txt", "train", "val/images", "val/val_annotations.txt"]
    missing = [n for n in needed if not (root / n).exists()]
    if missing:
        raise DatasetError(
            f"tiny-imagenet at {str(root)!r} lacks {', '.join(missing)}: expected the "
            "tiny-imagenet-200 layout ROOT/wnids.txt, ROOT/train/<wnid>/images/*.JPEG, "
            "ROOT/val/images/*.JPEG, ROOT/val/val_annotations.txt")


def check_dataset(cfg: DataConfig) -> None:
    """Cheap presence/layout check (no decoding), run before any output is written."""
    if cfg.name == "imagefolder":
        _check_imagefolder(Path(cfg.root or ""))
    elif cfg.name == "tiny-imagenet":
        _check_tiny_imagenet(Path(cfg.root or ""))
    elif cfg.name in ("cifar10", "cifar100", "food101") and not cfg.download:
        root = Path(cfg.root or os.path.join(os.path.expanduser("~"), ".cache", "kdgqa", cfg.name))
        folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
                  "food101": "food-101/images"}[cfg.name]
        if not (root / folder).is_dir():
            raise DatasetError(
                f"{cfg.name} not found: expected torchvision's layout {root}/{folder}/ "
                "(set data.download: true when online)")


def load_splits(cfg: DataConfig, seed: int = 0) -> DataSplits:
    """Decode the dataset once and split it; the val split comes out of train with ``seed``."""
    loaders = {"digits": _digits, "imagefolder": _imagefolder, "tiny-imagenet": _tiny_imagenet,
               "cifar10": _torchvision, "cifar100": _torchvision, "food101": _torchvision}
    train, test, classes = loaders[cfg.name](cfg, seed)
    if cfg.limit_train and len(train) > cfg.limit_train:
        gen = torch.Generator().manual_seed(seed + 1)
        keep = torch.randperm(len(train), generator=gen)[: cfg.limit_train]
        train = train.subset(keep.sort().values)
    train, val = _split_off(train, cfg.val_fraction, seed)
    return DataSplits(cfg.name, train, val, test, classes, split_origins(cfg, seed))


def _held(total: int, fraction: float) -> int:
    """How many of ``total`` images :func:`_split_off` holds out for ``fraction``."""
    return max(1, round(total * fraction))


#: Images in the official splits of the torchvision datasets (train, test).
_OFFICIAL_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000),
                   "food101": (75_750, 25_250)}


def _imagefolder_dirs(root: Path) -> tuple[Path, Path | None]:
    """The training folder and the test folder (ROOT/test, else ROOT/val) of an image tree."""
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    return (root / "train" if (root / "train").is_dir() else root), test_dir


def split_origins(cfg: DataConfig, seed: int = 0) -> SplitOrigins:
    """Where each split of ``cfg``'s dataset comes from (no image is read)."""
    val = f"{cfg.val_fraction:.0%} of the training images, held out with seed {seed}"
    held_test = f"{cfg.test_fraction:.0%} of the images, held out with seed {seed + 7919}"
    if cfg.name == "digits":
        return SplitOrigins("scikit-learn's digits", val, held_test)
    root = Path(cfg.root or "")
    if cfg.name == "imagefolder":
        train_dir, test_dir = _imagefolder_dirs(root)
        if test_dir is None:
            return SplitOrigins(str(train_dir), val, f"{held_test} from {train_dir}")
        unused = "; ROOT/val unused" if test_dir.name == "test" and (root / "val").is_dir() else ""
        return SplitOrigins(str(train_dir), val, f"{test_dir}{unused}")
    if cfg.name == "tiny-imagenet":
        return SplitOrigins(str(root / "train"), val, f"{root / 'val'}, the official validation "
                            "images")
    return SplitOrigins(f"the official {cfg.name} training split", val,
                        f"the official {cfg.name} test split")


def plan_splits(cfg: DataConfig, seed: int = 0) -> SplitPlan:
    """The sizes :func:`load_splits` gives for ``cfg``, counted from files, not decoded."""
    limit = cfg.limit_train
    train: int | None
    test: int | None
    if cfg.name == "digits":
        total = 1797  # scikit-learn's digits
        test = _held(total, cfg.test_fraction)
        train = total - test
    elif cfg.name == "imagefolder":
        train_dir, test_dir = _imagefolder_dirs(Path(cfg.root or ""))
        train = len(_class_tree(train_dir)[0])
        train = min(train, limit) if limit else train
        if test_dir is None:
            test = _held(train, cfg.test_fraction)
            train -= test
        else:
            test = len(_class_tree(test_dir)[0])
    elif cfg.name == "tiny-imagenet":
        root = Path(cfg.root or "")
        wnids = {w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()}
        train = sum(len(_images_in(root / "train" / w / "images")) for w in wnids)
        lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
        test = sum(1 for line in lines if len(parts := line.split("\t")) >= 2
                   and parts[1] in wnids)
    else:
        train, test = _OFFICIAL_SIZES.get(cfg.name, (None, None))
    if train is not None and limit:
        train = min(train, limit)
    val = None if train is None else _held(train, cfg.val_fraction)
    if train is not None and val is not None:
        train -= val
    return SplitPlan(cfg.name, train, val, test, split_origins(cfg, seed))


#: Below this many images a split's accuracy has a 95 % interval wider than +-10 points
#: (binomial at 50 %: 1.96 * sqrt(0.25 / n) <= 0.098 needs n >= 100).
MIN_EVAL_IMAGES = 100


def split_warnings(train: int | None, val: int | None, test: int | None,
                   batch_sizes: dict[str, int]) -> list[str]:
    """Lines warning about splits too small to measure with, or batches larger than the
    training split (``batch_sizes``: recipe name -> batch size)."""
    lines = []
    for name, count in (("validation", val), ("test", test)):
        if count is not None and count < MIN_EVAL_IMAGES:
            half = 196 * (0.25 / max(count, 1)) ** 0.5
            lines.append(f"warning: the {name} split has {count} image(s): its accuracy moves "
                         f"in steps of {100 / max(count, 1):.3g} points and a 95 % interval is "
                         f"about +-{min(half, 50):.0f} points; {MIN_EVAL_IMAGES} or more keep "
                         "it within +-10")
    for recipe, batch in batch_sizes.items():
        if train is not None and batch > train:
            lines.append(f"warning: {recipe}.batch_size {batch} is larger than the {train} "
                         "training images: every epoch is a single step")
    return lines


def describe_splits(splits: DataSplits) -> str:
    """One line naming each split of ``splits`` with its size and where it comes from."""
    origins = splits.origins or SplitOrigins("?", "?", "?")
    plan = SplitPlan(splits.name, len(splits.train), len(splits.val), len(splits.test), origins)
    return f"{plan.describe()}, {splits.num_classes} classes"


# --------------------------------------------------------------------------- augmentation

def _resize_uint8(images: Tensor, size: int) -> Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=size < images.shape[-1])
    return x.round().clamp(0, 255).to(torch.uint8)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    return (b + (a - b) * factor).clamp(0.0, 1.0)


def _grey(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation, applied per image on the images' device.

    ``randaugment_ops`` operations are drawn per image from RandAugment's list (identity,
    auto-contrast, brightness, colour, contrast, sharpness, posterize, solarize, rotate,
    shear x/y, translate x/y) at ``magnitude`` out of 30, each with a random sign. All
    geometric ops of one round share one ``grid_sample``; colour ops are computed for the
    batch and selected per image, so nothing waits on the host.
    """

    randaugment: bool = False
    randaugment_ops: int = 2
    magnitude: int = 9
    crop_padding: int = 0
    flip: bool = False

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Augment:
        return cls(cfg.randaugment, cfg.randaugment_ops, cfg.randaugment_magnitude,
                   cfg.crop_padding, cfg.flip)

    @property
    def active(self) -> bool:
        return (self.randaugment and self.randaugment_ops > 0) or self.crop_padding > 0 or self.flip

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Augment float images in [0, 1] ``(B, C, H, W)`` with randomness from ``gen``."""
        if self.crop_padding > 0:
            x = self._crop(x, gen)
        if self.flip:
            flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.randaugment:
            for _ in range(self.randaugment_ops):
                x = self._randaugment_round(x, gen)
        return x

    def _crop(self, x: Tensor, gen: torch.Generator) -> Tensor:
        b, _, h, w = x.shape
        p = self.crop_padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), device=x.device, generator=gen)
        dx = torch.randint(0, 2 * p + 1, (b,), device=x.device, generator=gen)
        rows = (torch.arange(h, device=x.device) + dy[:, None])[:, :, None]
        cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()

    _OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "sharpness",
            "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")

    def _randaugment_round(self, x: Tensor, gen: torch.Generator) -> Tensor:
        b = x.shape[0]
        dev = x.device
        m = self.magnitude / 30.0
        op = torch.randint(0, len(self._OPS), (b,), device=dev, generator=gen)
        sign = torch.where(torch.rand(b, device=dev, generator=gen) < 0.5, -1.0, 1.0)

        def pick(name: str) -> Tensor:
            return (op == self._OPS.index(name)).view(-1, 1, 1, 1)

        # Geometric ops: one affine matrix per image, identity for the others.
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        angle = sign * math.radians(30.0 * m)
        rot = (op == self._OPS.index("rotate")).float()
        cos, sin = torch.cos(angle * rot), torch.sin(angle * rot)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos
        shear = sign * 0.3 * m
        theta[:, 0, 1] += shear * (op == self._OPS.index("shear_x")).float()
        theta[:, 1, 0] += shear * (op == self._OPS.index("shear_y")).float()
        shift = sign * 2 * 0.45 * m  # affine_grid coordinates span 2 per image side
        theta[:, 0, 2] = shift * (op == self._OPS.index("translate_x")).float()
        theta[:, 1, 2] = shift * (op == self._OPS.index("translate_y")).float()
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        factor = (1.0 + sign * 0.9 * m).view(-1, 1, 1, 1)
        grey = _grey(x)
        low = x.amin(dim=(2, 3), keepdim=True)
        high = x.amax(dim=(2, 3), keepdim=True)
        auto = ((x - low) / (high - low).clamp_min(1e-3)).clamp(0, 1)
        blur_k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], device=dev, dtype=x.dtype) / 13
        c = x.shape[1]
        smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"),
                          blur_k.expand(c, 1, 3, 3), groups=c)
        bits = 8 - round(4 * m)
        levels = 2.0 ** bits
        colour_ops = {
            "autocontrast": auto,
            "brightness": _blend(x, torch.zeros_like(x), factor),
            "color": _blend(x, grey.expand_as(x), factor),
            "contrast": _blend(x, grey.mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor),
            "sharpness": _blend(x, smooth, factor),
            "posterize": torch.floor(x * (levels - 1e-3)) / max(levels - 1.0, 1.0),
            "solarize": torch.where(x >= 1.0 - m, 1.0 - x, x),
        }
        for name, value in colour_ops.items():
            out = torch.where(pick(name), value, out)
        return out


# --------------------------------------------------------------------------- batches

class Batches:
    """Seeded, resumable mini-batches from in-memory images, prepared on their device.

    The order of epoch ``e`` is a permutation drawn from a generator seeded with
    ``(seed, e)``, so it depends on nothing but those two numbers: resuming at
    ``(epoch, step)`` replays the same batches. With ``world_size > 1`` every rank takes its
    contiguous share of the same global batch, so N processes see exactly the images one
    process would (the global batch size must be divisible by the world size).
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        *,
        image_size: int,
        mean: float = 0.5,
        std: float = 0.5,
        augment: Augment | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % world_size:
            raise DatasetError(f"batch_size={batch_size} must be divisible by the world size "
                             f"{world_size} so every rank gets an equal share")
        self.data = data
        self.batch_size = batch_size
        self.image_size = image_size
        self.mean, self.std = mean, std
        self.augment = augment if augment is not None and augment.active else None
        self.shuffle = shuffle
        self.drop_last = drop_last and len(data) >= batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size

    @property
    def device(self) -> torch.device:
        return self.data.images.device

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """The global sample order of ``epoch`` (on the CPU)."""
        n = len(self.data)
        if not self.shuffle:
            return torch.arange(n)
        # Modulo 2**64: the generator's range (the same seed for every value that fits).
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
        return torch.randperm(n, generator=gen)

    def _generator(self, epoch: int, step: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + step) % 2**64)
        return gen

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(images, labels)`` for ``epoch`` from ``start_step`` on, ready for a model."""
        order = self.order(epoch)
        for step in range(start_step, len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            share = math.ceil(len(index) / self.world_size)
            index = index[self.rank * share:(self.rank + 1) * share].to(self.device)
            yield self.prepare(index, epoch, step), self.data.labels[index]

    def prepare(self, index: Tensor, epoch: int = 0, step: int = 0) -> Tensor:
        """Resize, augment (per image, seeded by epoch and step) and normalise images."""
        x = self.data.images[index]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x.float(), size=(self.image_size, self.image_size),
                              mode="bilinear", align_corners=False,
                              antialias=self.image_size < x.shape[-1]).div_(255.0).clamp_(0, 1)
        else:
            x = x.float().div_(255.0)
        if self.augment is not None:
            # Draw each image's randomness by its rank-independent position in the global
            # batch, so N ranks augment exactly as one process would.
            gen = self._generator(epoch, step)
            if self.world_size > 1:
                full = self.batch_size
                start = self.rank * math.ceil(full / self.world_size)
                x = self._augment_slice(x, gen, start, full)
            else:
                x = self.augment(x, gen)
        return (x - self.mean) / self.std

    def _augment_slice(self, x: Tensor, gen: torch.Generator, start: int, full: int) -> Tensor:
        # Augment a zero-padded global batch and keep this rank's rows: the same random draws
        # as a single process at the cost of augmenting the whole (cheap) batch.
        assert self.augment is not None
        padded = x.new_zeros((full, *x.shape[1:]))
        padded[start:start + x.shape[0]] = x
        return self.augment(padded, gen)[start:start + x.shape[0]]
