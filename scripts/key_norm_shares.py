"""Why the sound key-driven schemes kept the even split in the GPU study: each layer's key-norm
shares right after conversion, on the images the study uptrains on.

    PYTHONPATH=src python scripts/key_norm_shares.py --model .data/study-model \
        --data imagefolder:.data/cifar10 --images 1000

For G = 2 and 3 the model is converted to ``kdgqa`` (default form) and run on the first
``--images`` training images in batches of ``--batch``. Per layer: the largest KV head's share
of the batch-summed key norms (what ``kdgqa`` apportions from; mean and max over batches), the
map ``kdgqa`` chose, and for ``kdgqa-ps`` (one map per image) the share of images whose own map
is uneven. With ``min_queries=1`` the spare H - G heads go by largest remainder, so a map moves
only when one KV head's share is well above 1/G.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from kdgqa.conversion.converter import convert
from kdgqa.core.apportion import apportion, even_counts, key_norms
from kdgqa.io.sources import load_model
from kdgqa.study.calibration_images import dataset_config, training_images
from kdgqa.study.data import load_splits


def layer_keys(model: torch.nn.Module, images: torch.Tensor, batch: int) -> list[list[Any]]:
    """Per layer, the keys its allocator saw, one ``(B, G, N, D)`` tensor per batch."""
    keys: list[list[Any]] = [[] for _ in model.blocks]
    hooks = [block.attn.allocator.register_forward_hook(
        lambda _m, args, _out, i=i: keys[i].append(args[0].detach()))
        for i, block in enumerate(model.blocks)]
    with torch.no_grad():
        for start in range(0, len(images), batch):
            model(images[start:start + batch])
    for hook in hooks:
        hook.remove()
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the uptraining data, NAME:ROOT")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    args = parser.parse_args()

    base = load_model(args.model).float().eval()
    config = dataset_config(args.data, 32, args.images, what="--data")
    images = torch.cat(list(training_images(load_splits(config).train, config, args.images)))
    heads = base.blocks[0].attn.num_heads
    for kv_heads in (2, 3):
        model = convert(copy.deepcopy(base), "kdgqa", kv_heads).eval()
        even = torch.tensor(even_counts(heads, kv_heads))
        print(f"G = {kv_heads} (even split {even.tolist()}; {args.images} images, "
              f"batches of {args.batch})")
        for layer, batches in enumerate(layer_keys(model, images, args.batch)):
            shares, maps, uneven, per_image_max = [], [], 0, 0.0
            for k in batches:
                summed = key_norms(k)
                shares.append((summed.max() / summed.sum()).item())
                counts, _ = apportion(summed[None], heads, 1, False)
                maps.append(tuple(counts[0].tolist()))
                own = key_norms(k, per_sample=True)
                per_image_max = max(per_image_max, (own.max(1).values / own.sum(1)).max().item())
                own_counts, _ = apportion(own, heads, 1, False)
                uneven += int((own_counts != even).any(1).sum())
            print(f"  layer {layer:2d}: largest share mean {sum(shares) / len(shares):.3f} "
                  f"max {max(shares):.3f} | kdgqa maps {sorted(set(maps))} | kdgqa-ps: "
                  f"{100 * uneven / args.images:.1f} % of images uneven, largest share of an "
                  f"image {per_image_max:.3f}", flush=True)


if __name__ == "__main__":
    main()
