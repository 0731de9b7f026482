"""Which layer's conversion costs the model most: convert ONE attention layer at a time (the
others stay MHA) with each scheme and compare the model's outputs with the MHA model's.

    PYTHONPATH=src python scripts/per_layer_fidelity.py --model .data/study-model \
        --data tiny-imagenet:.data/tiny-imagenet-32 --kv-heads 2 --images 500

Calibrated schemes calibrate on the first images of CIFAR-10's training split as the study
does (``--calibration``), with ``selection="pooling"`` so each layer shows what the pooling
loss alone picks.
"""

from __future__ import annotations

import argparse
import copy

import torch

from kdgqa.conversion.converter import convert
from kdgqa.io.sources import load_model
from kdgqa.study.calibration_images import dataset_config, training_images
from kdgqa.study.config import DataConfig
from kdgqa.study.data import Batches, load_splits
from kdgqa.study.fidelity import compare, model_outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the model's own task, NAME:ROOT")
    parser.add_argument("--calibration", default="imagefolder:.data/cifar10")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--schemes", default="gqa,calibrated,similarity")
    args = parser.parse_args()

    base = load_model(args.model).float().eval()
    size = 32
    test = load_splits(dataset_config(args.data, size, args.images * 5, what="--data")).test
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:args.images]
    batches = Batches(test.subset(pick.sort().values), 250, image_size=size, mean=0.5,
                      std=0.5, shuffle=False, drop_last=False)
    reference = model_outputs(base, batches.epoch(0))
    cal_cfg = DataConfig(name="imagefolder", root=args.calibration.partition(":")[2],
                         image_size=size, val_fraction=0.1)
    train = load_splits(cal_cfg).train
    converted = {}
    for scheme in args.schemes.split(","):
        model = copy.deepcopy(base)
        extra = {}
        if scheme in ("calibrated", "similarity"):
            extra = {"calibration": training_images(train, cal_cfg, 512), "selection": "pooling"}
        converted[scheme] = convert(model, scheme, args.kv_heads, **extra)
        groups = [getattr(b.attn.allocator, "groups", lambda: None)() for b in model.blocks]
        print(f"{scheme} groups per layer: {groups}", flush=True)
    for layer in range(len(base.blocks)):
        cells = [f"layer {layer:2d}"]
        for scheme, model in converted.items():
            hybrid = copy.deepcopy(base)
            hybrid.blocks[layer].attn = copy.deepcopy(model.blocks[layer].attn)
            fid = compare(reference, model_outputs(hybrid, batches.epoch(0)))
            cells.append(f"{scheme}: agrees {100 * fid.agreement:.1f} % cos "
                         f"{fid.feature_cosine:.4f} err {fid.logit_relative_error:.4f}")
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
