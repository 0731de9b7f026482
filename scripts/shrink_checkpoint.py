"""Re-save a kdgqa checkpoint in a smaller dtype and in shards, e.g. to carry it between
machines whose transfers cap the file size (the GPU study's ViT-S/4: 41 MiB in bf16, three
15 MiB shards). ``kdgqa experiment`` casts a loaded checkpoint back to fp32 before training.

    python scripts/shrink_checkpoint.py SRC_DIR DST_DIR --dtype bfloat16 --max-shard 15MiB
"""

from __future__ import annotations

import argparse
import sys

import torch

from kdgqa.io.checkpoint import load, save_pretrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-shard", default="15MiB")
    args = parser.parse_args(argv)
    model = load(args.src).to(getattr(torch, args.dtype))
    save_pretrained(model, args.dst, max_shard_size=args.max_shard)
    print(f"{args.src} -> {args.dst} ({args.dtype}, shards <= {args.max_shard})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
