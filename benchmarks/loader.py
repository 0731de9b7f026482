"""Throughput of the in-memory loader alone (no model): images/s it can hand to training.

    python benchmarks/loader.py --dataset digits
    python benchmarks/loader.py --dataset imagefolder --root .data/cifar10 --image-size 224 \
        --randaugment --crop-padding 4 --flip --device cuda

Prints one JSON object: decode time, and images/s for plain batches and augmented batches.
If the augmented rate is well above the model's training img/s, the model sets the pace.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kdgqa.study.config import DataConfig
from kdgqa.study.data import Augment, Batches, load_splits
from kdgqa.study.distributed import resolve_device


def _rate(batches: Batches, steps: int, device: torch.device) -> float:
    it = batches.epoch(0)
    next(it)  # warm-up (kernel selection, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, images = time.perf_counter(), 0
    epoch = 0
    for _ in range(steps):
        try:
            x, _ = next(it)
        except StopIteration:
            epoch += 1
            it = batches.epoch(epoch)
            x, _ = next(it)
        images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--root", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--randaugment", action="store_true")
    p.add_argument("--crop-padding", type=int, default=0)
    p.add_argument("--flip", action="store_true")
    p.add_argument("--limit-train", type=int, default=0)
    args = p.parse_args()

    size = args.image_size or (8 if args.dataset == "digits" else 32)
    cfg = DataConfig(name=args.dataset, root=args.root, image_size=size,
                     randaugment=args.randaugment, crop_padding=args.crop_padding,
                     flip=args.flip, limit_train=args.limit_train)
    device = resolve_device(args.device)
    tic = time.perf_counter()
    splits = load_splits(cfg)
    decode_s = time.perf_counter() - tic
    train = splits.train.to(device)
    plain = Batches(train, args.batch_size, image_size=size)
    augmented = Batches(train, args.batch_size, image_size=size, augment=Augment.from_config(cfg))
    result = {
        "dataset": args.dataset, "device": str(device), "train_images": len(train),
        "stored_size": list(train.images.shape[1:]), "image_size": size,
        "batch_size": args.batch_size, "decode_seconds": round(decode_s, 2),
        "plain_img_per_s": round(_rate(plain, args.steps, device)),
        "augmented_img_per_s": round(_rate(augmented, args.steps, device)),
        "augmentation": {"randaugment": cfg.randaugment, "crop_padding": cfg.crop_padding,
                         "flip": cfg.flip},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
